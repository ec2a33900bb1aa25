/**
 * The HTTP transport: parse, validate, call one service method, serialize. Errors map to
 * statuses and bodies in api/errors.ts only; this module wires its answers in.
 */

import { pipeline, Readable } from "node:stream";
import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import Fastify, { type FastifyReply, type FastifyRequest, LogController } from "fastify";
import { ANONYMOUS, type Authenticator, isLoopback } from "../auth/authenticator.js";
import { type HostRule, hostAllowed, requestHosts } from "../auth/host-rule.js";
import type { ExecEvent } from "../guest/agent-client.js";
import { PodflareError } from "../sandboxes/errors.js";
import type { Caller, SandboxService } from "../sandboxes/service.js";
import type { Logger } from "../util/logger.js";
import { BodyIdleGuard } from "./body-idle.js";
import {
  clientErrorResponse,
  frameworkError,
  type HttpError,
  httpError,
  routeNotFound,
  toHttpError,
} from "./errors.js";
import { withHeartbeat } from "./heartbeat.js";
import {
  CreateBody,
  ExecBody,
  FileQuery,
  ForkBody,
  MergeParams,
  SandboxIdParams,
} from "./schemas.js";

export interface ServerDeps {
  service: SandboxService;
  auth: Authenticator;
  capacity: (caller: Caller) => Promise<Record<string, unknown>>;
  metrics?: () => Promise<{ contentType: string; body: string }>;
  log: Logger;
  /** Told of every route as it is registered (the OpenAPI sync test uses it). */
  onRoute?: (route: { url: string; method: string }) => void;
  /** Which `Host` a request may carry while no key exists (default: loopback only). */
  hostRule?: HostRule;
  /** Timeouts and limits of the HTTP server (defaults: DEFAULT_HTTP_LIMITS). */
  http?: Partial<HttpLimits>;
}

declare module "fastify" {
  interface FastifyContextConfig {
    /** Served without a key. Only GET /v1/healthz sets it; every other route needs one. */
    public?: boolean;
  }
}

/** Timeouts (ms; 0 turns one off) and limits of the HTTP server; config.ts sets them. */
export interface HttpLimits {
  /** Receiving a request's headers (slowloris). */
  headersTimeoutMs: number;
  /** Receiving a whole request, body included (not the response: exec streams last). */
  requestTimeoutMs: number;
  /** A request body with no byte arriving while the daemon waits for one. */
  bodyIdleTimeoutMs: number;
  /** An idle keep-alive connection between requests. */
  keepAliveTimeoutMs: number;
  /** Connections open at once; past it, new ones are closed at once. */
  maxConnections: number;
  /** An exec stream with nothing to send gets an empty line this often (api/heartbeat.ts; 0: never). */
  streamHeartbeatMs: number;
}

export const DEFAULT_HTTP_LIMITS: HttpLimits = {
  headersTimeoutMs: 20_000,
  requestTimeoutMs: 3_600_000,
  bodyIdleTimeoutMs: 60_000,
  keepAliveTimeoutMs: 10_000,
  maxConnections: 1024,
  streamHeartbeatMs: 15_000,
};

export function buildServer(deps: ServerDeps) {
  const { service } = deps;
  const limits: HttpLimits = { ...DEFAULT_HTTP_LIMITS, ...deps.http };
  const hostRule: HostRule = deps.hostRule ?? { bindHost: "127.0.0.1", allowedHosts: [] };
  const app = Fastify({
    loggerInstance: deps.log,
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: 2 * 1024 * 1024,
    // On shutdown every sandbox is destroyed anyway: do not wait out clients' keep-alive.
    forceCloseConnections: true,
    // Timeouts for receiving requests only: a response (an exec stream) may last hours, so
    // there is no idle timeout on the socket (Fastify's connectionTimeout stays 0).
    requestTimeout: limits.requestTimeoutMs,
    keepAliveTimeout: Math.max(1, limits.keepAliveTimeoutMs),
    http: {
      headersTimeout: limits.headersTimeoutMs,
      // How often Node checks the two timeouts above (its default, 30 s, would let a
      // slowloris client hold a connection that much longer than headersTimeout).
      connectionsCheckingInterval: checkingInterval(limits),
    },
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: false } },
    // Long ids reach the schema (which says what is wrong) instead of falling to "no route".
    routerOptions: { maxParamLength: 1024 },
    // Errors Fastify meets before routing (a malformed %-escape) get the contract's body.
    frameworkErrors: (err, request, reply) => {
      // Even a malformed URL is answered only to a caller who may call (default deny).
      const { status, body } = gate(request) ?? frameworkError(err);
      void (reply as unknown as FastifyReply).code(status).send(body);
    },
    // A request Node cannot parse at all: answer in the contract's shape, then hang up.
    clientErrorHandler: (err, socket) => {
      const inFlight = (socket as { _httpMessage?: { headersSent?: boolean } })._httpMessage;
      if (!socket.writable || inFlight?.headersSent) return socket.destroy();
      socket.end(clientErrorResponse((err as { code?: string }).code, limits));
    },
  }).withTypeProvider<TypeBoxTypeProvider>();

  if (deps.onRoute) {
    const onRoute = deps.onRoute;
    app.addHook("onRoute", (r) => {
      for (const method of [r.method].flat()) onRoute({ url: r.url, method });
    });
  }

  app.setErrorHandler((err, request, reply) => {
    const { status, body } = toHttpError(err);
    if (request.raw.socket?.destroyed) {
      // The client left (or was cut: a stalled body) before the reply: nothing failed here.
      request.log.info(
        { url: request.url.split("?")[0], status, error: String(err) },
        "client gone",
      );
    } else if (status === 503)
      request.log.warn({ url: request.url, error: body.error }, "no capacity");
    else if (status >= 500) request.log.error({ err, url: request.url }, "request failed");
    void reply.status(status).send(body);
  });
  app.setNotFoundHandler((request, reply) => {
    const { status, body } = routeNotFound(request.method, request.url);
    void reply.status(status).send(body);
  });
  app.addHook("onResponse", (request, reply, done) => {
    request.log.info(
      {
        method: request.method,
        url: request.url.split("?")[0],
        status: reply.statusCode,
        ms: Math.round(reply.elapsedTime),
      },
      "request",
    );
    done();
  });

  // Cut a request body that stops arriving (a slow-body client holds a connection).
  if (limits.bodyIdleTimeoutMs > 0) {
    app.addHook("preParsing", async (request, _reply, payload) => {
      const h = request.headers;
      if (!h["transfer-encoding"] && !(Number(h["content-length"]) > 0)) return payload;
      const guard = new BodyIdleGuard(limits.bodyIdleTimeoutMs, () => {
        request.log.warn(
          { url: request.url.split("?")[0], idleMs: limits.bodyIdleTimeoutMs },
          "request body stalled; connection cut (PODFLARE_HTTP_BODY_IDLE_TIMEOUT_MS)",
        );
        request.raw.socket?.destroy();
      });
      pipeline(payload, guard, () => {});
      return guard;
    });
  }

  if (limits.maxConnections > 0) app.server.maxConnections = limits.maxConnections;

  // Who calls: decided once per request, before any body is read, from the route Fastify
  // matched (never from the raw URL, which has many spellings of one route). Default deny.
  const callers = new WeakMap<object, Caller>();
  const caller = (request: object): Caller => callers.get(request) ?? null;
  /** Why this request may not go on (null: it may). Records the caller when it may. */
  function gate(request: FastifyRequest): HttpError | null {
    const auth = deps.auth.authenticate(request.headers.authorization);
    if (auth.ok && auth.tenant === ANONYMOUS) {
      const hosts = requestHosts(request.raw.rawHeaders, request.raw.url ?? "");
      const bad = hosts.find((h) => !hostAllowed(h, hostRule));
      if (hosts.length > 0 && bad === undefined) return null;
      return httpError(
        "forbidden",
        `${bad === undefined ? "refusing a request without a Host header" : `refusing a request for Host ${JSON.stringify(bad).slice(0, 80)}`}: ` +
          "with no API key configured, this daemon answers only requests addressed to localhost, 127.0.0.1 or [::1] " +
          "(so no web page can reach it by DNS rebinding). Call it at http://127.0.0.1:<port>, " +
          `or create a key (podflare keys create --name <name>)${isLoopback(hostRule.bindHost) ? "" : ", or list the name in PODFLARE_ALLOWED_HOSTS"}`,
      );
    }
    const isPublic = !request.is404 && request.routeOptions.config?.public === true;
    if (isPublic) return null;
    if (auth.ok) {
      callers.set(request, auth.tenant);
      return null;
    }
    return httpError("unauthorized", auth.reason);
  }
  app.addHook("onRequest", (request, reply, done) => {
    const refused = gate(request);
    if (!refused) return done();
    void reply.header("connection", "close").status(refused.status).send(refused.body);
  });

  app.get("/v1/healthz", { config: { public: true } }, async (_req, reply) =>
    reply.type("text/plain").send("ok"),
  );
  app.get("/v1/capacity", async (req) => deps.capacity(caller(req)));
  if (deps.metrics) {
    const metrics = deps.metrics;
    app.get("/metrics", async (_req, reply) => {
      const m = await metrics();
      return reply.type(m.contentType).send(m.body);
    });
  }

  app.post("/v1/sandboxes", { schema: { body: CreateBody } }, async (req, reply) => {
    const info = await service.create(caller(req), req.body ?? {});
    return reply.status(201).send(info);
  });
  app.get("/v1/sandboxes", async (req) => ({ sandboxes: service.list(caller(req)) }));
  app.get("/v1/sandboxes/:id", { schema: { params: SandboxIdParams } }, async (req) =>
    service.info(caller(req), req.params.id),
  );
  app.delete("/v1/sandboxes/:id", { schema: { params: SandboxIdParams } }, async (req, reply) => {
    await service.destroy(caller(req), req.params.id);
    return reply.status(204).send();
  });

  app.post(
    "/v1/sandboxes/:id/exec",
    { schema: { params: SandboxIdParams, body: ExecBody } },
    async (req, reply) => {
      // What this stream holds unsent here is charged to its caller's budget, and its
      // exec is dropped as soon as the client goes (sandboxes/stream-budget.ts).
      const gone = new AbortController();
      let body: Readable | undefined;
      const events = service.exec(caller(req), req.params.id, req.body, {
        signal: gone.signal,
        heldBytes: () => (body?.readableLength ?? 0) + reply.raw.writableLength,
      });
      reply.raw.once("close", () => gone.abort());
      // Bytes, not objects: readableLength then counts what the buffer holds.
      body = Readable.from(withHeartbeat(ndjson(events), limits.streamHeartbeatMs), {
        objectMode: false,
        highWaterMark: 64 * 1024,
      });
      return reply.type("application/x-ndjson").send(body);
    },
  );

  app.post(
    "/v1/sandboxes/:id/fork",
    { schema: { params: SandboxIdParams, body: ForkBody } },
    async (req, reply) => {
      const children = await service.fork(caller(req), req.params.id, req.body?.n ?? 1);
      return reply.status(201).send({ children });
    },
  );
  app.post(
    "/v1/sandboxes/:id/merge_into/:winner",
    { schema: { params: MergeParams } },
    async (req, reply) => {
      await service.mergeInto(caller(req), req.params.id, req.params.winner);
      return reply.status(204).send();
    },
  );

  // Files: raw bytes streamed straight through, never buffered whole.
  void app.register(async (plugin) => {
    const files = plugin.withTypeProvider<TypeBoxTypeProvider>();
    files.removeAllContentTypeParsers();
    files.addContentTypeParser("*", (_req, payload, done) => done(null, payload));
    files.put(
      "/v1/sandboxes/:id/files",
      { schema: { params: SandboxIdParams, querystring: FileQuery } },
      async (req, reply) => {
        const length = req.headers["content-length"]
          ? Number(req.headers["content-length"])
          : undefined;
        const body = (req.body as Readable | undefined) ?? Readable.from([]);
        try {
          await service.upload(caller(req), req.params.id, req.query.path, body, length);
        } catch (err) {
          // Stop reading a body we refuse; the connection closes after the error reply.
          if (err instanceof PodflareError) void reply.header("connection", "close");
          throw err;
        }
        return reply.status(204).send();
      },
    );
    files.get(
      "/v1/sandboxes/:id/files",
      { schema: { params: SandboxIdParams, querystring: FileQuery } },
      async (req, reply) => {
        const { size, stream } = await service.download(caller(req), req.params.id, req.query.path);
        // The stream fails if the guest sends more or fewer than `size` bytes. Once bytes
        // are out, Fastify destroys the connection (the client sees a truncated response,
        // never bytes misread as the next one); before, the error is answered in the
        // contract's shape (without the stream's headers, which Fastify has already put on
        // the raw response) and the connection closed all the same.
        if (stream.errored) {
          void reply.header("connection", "close");
          throw stream.errored; // failed in the very chunk that opened it
        }
        stream.once("error", () => {
          if (reply.raw.headersSent) return;
          reply.raw.removeHeader("content-type");
          reply.raw.removeHeader("content-length");
          reply.raw.setHeader("connection", "close");
        });
        return reply.type("application/octet-stream").header("content-length", size).send(stream);
      },
    );
  });

  return app;
}

async function* ndjson(events: AsyncIterable<ExecEvent>): AsyncGenerator<string> {
  let seq = 0;
  for await (const event of events) {
    yield `${JSON.stringify({ ...event, seq: seq++, ts: Date.now() })}\n`;
  }
}

/** Often enough that a timeout fires within a fraction of itself (Node's default: 30 s). */
function checkingInterval(l: HttpLimits): number {
  const shortest = Math.min(
    ...[l.headersTimeoutMs, l.requestTimeoutMs].filter((ms) => ms > 0),
    4_000,
  );
  return Math.max(50, Math.floor(shortest / 4));
}

export type PodflareServer = ReturnType<typeof buildServer>;
