/**
 * The HTTP transport: parse, validate, call one service method, serialize. Errors map to
 * statuses in api/errors.ts only.
 */
import { Readable } from "node:stream";
import type { TypeBoxTypeProvider } from "@fastify/type-provider-typebox";
import Fastify, { type FastifyReply, LogController } from "fastify";
import type { Authenticator } from "../auth/authenticator.js";
import type { ExecEvent } from "../guest/agent-client.js";
import { PodflareError } from "../sandboxes/errors.js";
import type { Caller, SandboxService } from "../sandboxes/service.js";
import type { Logger } from "../util/logger.js";
import { type ErrorBody, toHttpError } from "./errors.js";
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
}

export function buildServer(deps: ServerDeps) {
  const { service } = deps;
  const app = Fastify({
    loggerInstance: deps.log,
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: 2 * 1024 * 1024,
    // On shutdown every sandbox is destroyed anyway: do not wait out clients' keep-alive.
    forceCloseConnections: true,
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: false } },
    // Long ids reach the schema (which says what is wrong) instead of falling to "no route".
    routerOptions: { maxParamLength: 1024 },
    // Errors Fastify meets before routing (a malformed %-escape) get the contract's body.
    frameworkErrors: (err, _request, reply) => {
      const body: ErrorBody = { error: `invalid request: ${err.message}`, code: "bad_request" };
      void (reply as unknown as FastifyReply).code(400).send(body);
    },
    // A request Node cannot parse at all: answer in the contract's shape, then hang up.
    clientErrorHandler: (err, socket) => {
      if (!socket.writable) return socket.destroy();
      const tooLarge = (err as { code?: string }).code === "HPE_HEADER_OVERFLOW";
      const body = JSON.stringify(
        tooLarge
          ? { error: "the request headers are too large", code: "too_large" }
          : { error: "the request could not be parsed as HTTP/1.1", code: "bad_request" },
      );
      socket.end(
        `HTTP/1.1 ${tooLarge ? "431 Request Header Fields Too Large" : "400 Bad Request"}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
      );
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
    if (status === 503) request.log.warn({ url: request.url, error: body.error }, "no capacity");
    else if (status >= 500) request.log.error({ err, url: request.url }, "request failed");
    void reply.status(status).send(body);
  });
  app.setNotFoundHandler((request, reply) => {
    void reply.status(404).send({
      error: `no route ${request.method} ${request.url.split("?")[0]}`,
      code: "not_found",
    });
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

  // Who calls: resolved once per request, before any body is read.
  const callers = new WeakMap<object, Caller>();
  const caller = (request: object): Caller => callers.get(request) ?? null;
  app.addHook("onRequest", (request, reply, done) => {
    const path = request.url.split("?")[0] ?? "";
    if (path === "/v1/healthz" || !(path.startsWith("/v1/") || path === "/metrics")) return done();
    const auth = deps.auth.authenticate(request.headers.authorization);
    if (auth.ok) {
      callers.set(request, auth.tenant);
      return done();
    }
    void reply.header("connection", "close").status(401).send({
      error: auth.reason,
      code: "unauthorized",
    });
  });

  app.get("/v1/healthz", async (_req, reply) => reply.type("text/plain").send("ok"));
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
      body = Readable.from(ndjson(events), { objectMode: false, highWaterMark: 64 * 1024 });
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

export type PodflareServer = ReturnType<typeof buildServer>;
