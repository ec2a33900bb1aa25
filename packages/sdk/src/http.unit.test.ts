/**
 * What the SDK sends and how it reads what comes back, against a local HTTP server that
 * answers as the daemon would (or cuts its answer short, as no healthy daemon can be made to).
 */
import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, describe, it } from "node:test";
import { ConnectionError, NotFoundError, PodflareError, TimeoutError } from "./errors.js";
import { errorFromTransport } from "./http.js";
import { Sandbox } from "./sandbox.js";

const ODD = "sbx a/b?c#d";
const INFO = {
  id: ODD,
  state: "ready",
  template: "default",
  vcpu_count: 2,
  mem_size_mib: 1024,
  created_at: "2026-01-01T00:00:00.000Z",
  expires_at: "2026-01-01T00:05:00.000Z",
  metadata: {},
};

describe("the TypeScript SDK's requests and their failures", () => {
  const seen: string[] = [];
  let host = "";
  let exec: (res: ServerResponse) => void = () => {};
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    seen.push(`${req.method} ${req.url}`);
    req.resume();
    req.on("end", () => {
      const json = (status: number, body: unknown) =>
        res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body));
      if (req.url?.startsWith("/v1/sandboxes/nope"))
        return json(404, { error: "no sandbox nope", code: "not_found" });
      if (req.url?.endsWith("/exec")) return exec(res);
      if (req.url?.endsWith("/fork")) return json(201, { children: [ODD] });
      if (req.method === "GET" && req.url?.includes("/files")) return res.end("bytes");
      if (req.method === "GET") return json(200, INFO);
      res.writeHead(204).end();
    });
  });
  before(async () => {
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    host = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(() => server.close());

  it("URL-encodes the sandbox id in every path", async () => {
    exec = (res) => res.end('{"type":"exit","code":0,"seq":0,"ts":1}\n');
    const s = await Sandbox.connect(ODD, { host });
    await s.getInfo();
    await s.runCode("1");
    const [child] = await s.fork();
    await s.upload("/root/f", "x");
    await s.download("/root/f");
    await s.mergeInto(ODD);
    await child?.close();
    const id = encodeURIComponent(ODD);
    assert.deepEqual(seen, [
      `GET /v1/sandboxes/${id}`,
      `GET /v1/sandboxes/${id}`,
      `POST /v1/sandboxes/${id}/exec`,
      `POST /v1/sandboxes/${id}/fork`,
      `GET /v1/sandboxes/${id}`,
      `PUT /v1/sandboxes/${id}/files?path=%2Froot%2Ff`,
      `GET /v1/sandboxes/${id}/files?path=%2Froot%2Ff`,
      `POST /v1/sandboxes/${id}/merge_into/${id}`,
      `DELETE /v1/sandboxes/${id}`,
    ]);
  });

  it("reads the exit event's flags into ExecResult, cancelled included", async () => {
    exec = (res) =>
      res.end(
        '{"type":"stdout","data":"a","seq":0,"ts":1}\n{"type":"exit","code":130,"cancelled":true,"seq":1,"ts":2}\n',
      );
    const s = await Sandbox.connect(ODD, { host });
    assert.deepEqual(await s.runCode("x"), {
      stdout: "a",
      stderr: "",
      exitCode: 130,
      cancelled: true,
    });
  });

  it("a stream that ends without its exit event is a ConnectionError", async () => {
    exec = (res) => res.end('{"type":"stdout","data":"a","seq":0,"ts":1}\n');
    const s = await Sandbox.connect(ODD, { host });
    await assert.rejects(
      s.runCode("x"),
      (e) => e instanceof ConnectionError && /exit event/.test(e.message),
    );
  });

  it("a stream cut mid-way is a ConnectionError", async () => {
    exec = (res) => {
      res.writeHead(200, { "content-type": "application/x-ndjson" });
      res.write('{"type":"stdout","data":"a","seq":0,"ts":1}\n', () => res.socket?.destroy());
    };
    const s = await Sandbox.connect(ODD, { host });
    await assert.rejects(s.runCode("x"), (e) => e instanceof ConnectionError && e.status === null);
  });

  it("an error answer is its class, with the daemon's status, code and message", async () => {
    await assert.rejects(
      Sandbox.connect("nope", { host }),
      (e) =>
        e instanceof NotFoundError &&
        e.name === "NotFoundError" &&
        e.status === 404 &&
        e.code === "not_found" &&
        e.message === "no sandbox nope",
    );
  });

  it("a daemon that sends nothing for too long is a TimeoutError, a kind of ConnectionError", () => {
    // The shape of undici's body timeout (300 s by default: too long to wait for here).
    const cause = Object.assign(new Error("Body Timeout Error"), { code: "UND_ERR_BODY_TIMEOUT" });
    const e = errorFromTransport(new TypeError("terminated", { cause }), host, "while it answered");
    assert.ok(e instanceof TimeoutError && e instanceof ConnectionError);
    assert.equal(e.name, "TimeoutError");
    const cut = errorFromTransport(new TypeError("terminated"), host, "while it answered");
    assert.ok(cut instanceof ConnectionError && !(cut instanceof TimeoutError));
    const own = new PodflareError("as it was");
    assert.equal(errorFromTransport(own, host, ""), own);
  });
});
