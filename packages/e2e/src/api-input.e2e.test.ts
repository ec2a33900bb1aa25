/**
 * Malformed and hostile API input against a real daemon: for every route of
 * spec/openapi.yaml, malformed JSON, wrong content types, wrong field types, out-of-range
 * numbers, extra fields, bodies past the limits, odd ids and odd file paths. Each must be
 * answered with a 4xx and the contract's `{error, code}` body (never a 500), the daemon's
 * memory must stay bounded (huge bodies are refused, not buffered), and ordinary requests
 * must still work afterwards.
 */
import assert from "node:assert/strict";
import { request as httpRequest } from "node:http";
import { after, before, describe, it } from "node:test";
import { Sandbox } from "podflare";
import { startTestDaemon, type TestDaemon } from "./harness.js";

const UPLOAD_CAP = 8 * 1024 * 1024;
const ERROR_CODES = new Set([
  "bad_request",
  "unauthorized",
  "not_found",
  "file_not_found",
  "wrong_state",
  "sandbox_dead",
  "too_large",
  "over_limit",
  "too_many_streams",
  "no_capacity",
  "not_implemented",
  "internal",
]);

type Body = string | Buffer | (() => AsyncGenerator<Buffer>);
interface Case {
  name: string;
  method: string;
  path: string;
  body?: Body;
  headers?: Record<string, string>;
  /** Statuses allowed besides "any 4xx"; e.g. 204 where odd input is still valid. */
  ok?: number[];
  /** Only this status is right. */
  status?: number;
}
interface Answer {
  status: number;
  text: string;
  /** The connection was cut by the server while the request body was still being sent. */
  cut?: string;
}

/** One request with full control of method, raw path, headers and a (streamed) body. */
function send(base: string, c: Case): Promise<Answer> {
  const url = new URL(base);
  return new Promise((resolve) => {
    let answered: Answer | null = null;
    const req = httpRequest(
      {
        host: url.hostname,
        port: url.port,
        method: c.method,
        path: c.path,
        agent: false, // a fresh connection each: a refused request never poisons the next
        headers: { connection: "close", ...c.headers },
      },
      (res) => {
        const parts: Buffer[] = [];
        let size = 0;
        res.on("data", (d: Buffer) => {
          size += d.length;
          if (size < 1 << 20) parts.push(d);
        });
        res.on("end", () => {
          answered = { status: res.statusCode ?? 0, text: Buffer.concat(parts).toString() };
          resolve(answered);
        });
        res.on("error", (err) =>
          resolve(answered ?? { status: res.statusCode ?? 0, text: "", cut: err.message }),
        );
      },
    );
    req.on("error", (err) => {
      // A refused upload: the server answers and closes while we still send. Node may
      // report the reset before the response; that still counts as refused, unbuffered.
      if (!answered) resolve({ status: 0, text: "", cut: err.message });
    });
    const body = c.body;
    if (typeof body === "function") {
      (async () => {
        try {
          for await (const piece of body()) {
            if (req.destroyed) return;
            if (!req.write(piece)) await new Promise((r) => req.once("drain", r));
          }
          req.end();
        } catch {
          // the socket was closed under us: the error handler above reports it
        }
      })();
    } else {
      req.end(body);
    }
  });
}

async function* zeros(total: number, piece = 1 << 20): AsyncGenerator<Buffer> {
  const chunk = Buffer.alloc(piece);
  for (let sent = 0; sent < total; sent += piece) yield chunk;
}

const json = { "content-type": "application/json" };
/**
 * Fields invalid for every JSON route (exec needs a string code, fork n >= 1, create
 * vcpu_count >= 1): extra fields are allowed, so a body must be wrong on its own account
 * for a route to be expected to refuse it whatever else happens to it.
 */
const INVALID = '"code":5,"n":0,"vcpu_count":0';
const octets = { "content-type": "application/octet-stream" };

describe("malformed API input", () => {
  let d: TestDaemon;
  let sbx: Sandbox;

  before(async () => {
    d = await startTestDaemon({ maxUploadBytes: UPLOAD_CAP });
    sbx = await Sandbox.create({ host: d.url });
  });
  after(async () => {
    await d?.close();
  });

  function cases(): Case[] {
    const id = sbx.id;
    const out: Case[] = [];
    const sb = `/v1/sandboxes/${id}`;
    const longId = "a".repeat(10 * 1024);
    const oddIds = [
      encodeURIComponent("../../etc/passwd"),
      "..%2F..%2F..%2Fvar%2Flib%2Fpodflare",
      "%2e%2e",
      encodeURIComponent("sbx_é"),
      encodeURIComponent("sbx_😀\u202e"),
      "sbx_%00",
      "%00",
      "%20",
      id.toUpperCase(),
      `${id}x`,
      longId,
      encodeURIComponent("' OR 1=1 --"),
      "%zz",
      "%E0%A4%A",
      "%ED%A0%80",
    ];

    // Odd ids on every route that takes one (read-only or harmless for an unknown id).
    for (const oid of oddIds) {
      const p = `/v1/sandboxes/${oid}`;
      out.push({ name: `GET info id=${oid.slice(0, 30)}`, method: "GET", path: p });
      out.push({ name: `DELETE id=${oid.slice(0, 30)}`, method: "DELETE", path: p });
      out.push({
        name: `exec id=${oid.slice(0, 30)}`,
        method: "POST",
        path: `${p}/exec`,
        headers: json,
        body: '{"code":"print(1)"}',
      });
      out.push({
        name: `fork id=${oid.slice(0, 30)}`,
        method: "POST",
        path: `${p}/fork`,
        headers: json,
        body: '{"n":1}',
      });
      out.push({
        name: `merge_into id=${oid.slice(0, 30)}`,
        method: "POST",
        path: `${p}/merge_into/${id}`,
      });
      out.push({
        name: `merge_into winner=${oid.slice(0, 30)}`,
        method: "POST",
        path: `${sb}/merge_into/${oid}`,
      });
      out.push({
        name: `upload id=${oid.slice(0, 30)}`,
        method: "PUT",
        path: `${p}/files?path=/root/x`,
        headers: octets,
        body: "x",
      });
      out.push({
        name: `download id=${oid.slice(0, 30)}`,
        method: "GET",
        path: `${p}/files?path=/etc/hostname`,
      });
    }
    out.push({ name: "merge_into itself", method: "POST", path: `${sb}/merge_into/${id}` });

    // Malformed bodies on every JSON route (the create and fork ones never reach a VM).
    const badBodies: [string, string | Buffer, Record<string, string>][] = [
      ["malformed JSON", '{"code": ', json],
      ["trailing garbage", '{"code":"1"} x', json],
      ["JSON null", "null", json],
      ["JSON array", "[]", json],
      ["JSON string", '"print(1)"', json],
      ["JSON number", "42", json],
      ["empty JSON body", "", json],
      [
        "invalid UTF-8",
        Buffer.concat([
          Buffer.from('{"'),
          Buffer.from([0xff, 0xfe, 0xc0]),
          Buffer.from(`":1,${INVALID}}`),
        ]),
        json,
      ],
      ["invalid UTF-8 only", Buffer.from([0x7b, 0x22, 0xff, 0x22, 0x7d]), json],
      ["__proto__ pollution", `{"__proto__":{"polluted":1},${INVALID}}`, json],
      [
        "constructor.prototype pollution",
        `{"constructor":{"prototype":{"polluted":1}},${INVALID}}`,
        json,
      ],
      ["deeply nested", `{${INVALID},"x":${"[".repeat(100_000)}${"]".repeat(100_000)}}`, json],
      [
        "deeply nested with constructor",
        `{${INVALID},"x":${"[".repeat(50_000)}{"constructor":{"prototype":1}}${"]".repeat(50_000)}}`,
        json,
      ],
      ["text/plain", `{${INVALID}}`, { "content-type": "text/plain" }],
      [
        "form encoded",
        "code=print(1)&n=1",
        { "content-type": "application/x-www-form-urlencoded" },
      ],
      ["no content type", `{${INVALID}}`, {}],
      ["charset", `{${INVALID}}`, { "content-type": "application/json; charset=ebcdic" }],
      ["multipart", "--x\r\n\r\n--x--", { "content-type": "multipart/form-data; boundary=x" }],
    ];
    for (const [what, body, headers] of badBodies) {
      out.push({ name: `create: ${what}`, method: "POST", path: "/v1/sandboxes", body, headers });
      out.push({ name: `exec: ${what}`, method: "POST", path: `${sb}/exec`, body, headers });
      out.push({ name: `fork: ${what}`, method: "POST", path: `${sb}/fork`, body, headers });
    }

    // Wrong field types, out-of-range numbers, extra fields (each with something invalid).
    const createBodies: unknown[] = [
      { vcpu_count: 0 },
      { vcpu_count: -1 },
      { vcpu_count: 1.5 },
      { vcpu_count: "2" },
      { vcpu_count: 1e300 },
      { vcpu_count: 64 },
      { vcpu_count: 65 },
      { mem_size_mib: 127 },
      { mem_size_mib: 1e12 },
      { mem_size_mib: 1024 * 1024 },
      { mem_size_mib: null },
      { timeout_ms: 0 },
      { timeout_ms: -5 },
      { timeout_ms: 1e20 },
      { timeout_ms: 2 ** 53 },
      { timeout_ms: "1000" },
      { template: "" },
      { template: "../../../etc/passwd" },
      { template: "x".repeat(65) },
      { template: 5 },
      { metadata: "x" },
      { metadata: [] },
      { metadata: { a: 1 } },
      { metadata: { a: null } },
      { metadata: { a: { b: "c" } } },
      { metadata: { a: "x".repeat(1025) } },
      { metadata: Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, "v"])) },
      { vcpu_count: 0, extra: { deep: [1, 2, 3] } },
      { template: "nope", unknown_field: true },
    ];
    for (const body of createBodies)
      out.push({
        name: `create ${JSON.stringify(body).slice(0, 60)}`,
        method: "POST",
        path: "/v1/sandboxes",
        headers: json,
        body: JSON.stringify(body),
      });
    const execBodies: unknown[] = [
      {},
      { code: 5 },
      { code: null },
      { code: ["print(1)"] },
      { code: { a: 1 } },
      { code: true },
      { code: "1", language: "ruby" },
      { code: "1", language: "PYTHON" },
      { code: "1", language: 1 },
      { code: "1", language: null },
      { code: "1", timeout_ms: 0 },
      { code: "1", timeout_ms: -1 },
      { code: "1", timeout_ms: 1.5 },
      { code: "1", timeout_ms: 86_400_001 },
      { code: "1", timeout_ms: 1e300 },
      { code: "1", timeout_ms: "100" },
      { code: "1", timeout_ms: null },
      { code: "x".repeat(1024 * 1024 + 1) },
      { code: "é".repeat(600 * 1024) }, // within maxLength (characters), over 1 MiB of UTF-8
      { language: "python", extra: 1 },
    ];
    for (const body of execBodies)
      out.push({
        name: `exec ${JSON.stringify(body).slice(0, 60)}`,
        method: "POST",
        path: `${sb}/exec`,
        headers: json,
        body: JSON.stringify(body),
      });
    for (const n of [0, -1, 33, 1.5, "2", null, 1e300, [1], { n: 1 }])
      out.push({
        name: `fork n=${JSON.stringify(n)}`,
        method: "POST",
        path: `${sb}/fork`,
        headers: json,
        body: JSON.stringify({ n, extra: "x" }),
      });

    // Bodies past the limits: refused, not buffered (the memory check below).
    for (const [name, path] of [
      ["create", "/v1/sandboxes"],
      ["exec", `${sb}/exec`],
      ["fork", `${sb}/fork`],
    ] as const) {
      out.push({
        name: `${name}: 3 MiB declared body`,
        method: "POST",
        path,
        headers: { ...json, "content-length": String(3 << 20) },
        body: () => zeros(3 << 20),
        status: 413,
      });
      out.push({
        name: `${name}: 256 MiB chunked body`,
        method: "POST",
        path,
        headers: json,
        body: () => zeros(256 << 20),
        status: 413,
      });
    }
    out.push({
      name: "upload: 256 MiB declared",
      method: "PUT",
      path: `${sb}/files?path=/root/huge.bin`,
      headers: { ...octets, "content-length": String(256 << 20) },
      body: () => zeros(256 << 20),
      status: 413,
    });
    out.push({
      name: "upload: 256 MiB chunked",
      method: "PUT",
      path: `${sb}/files?path=/root/huge2.bin`,
      headers: octets,
      body: () => zeros(256 << 20),
      status: 413,
    });

    // Bad file paths on both file routes.
    const badPaths = [
      "",
      "relative/path",
      "../etc/passwd",
      "./x",
      "/tmp/a%00b",
      "%00",
      "/",
      "/root/",
      "/root",
      "/proc",
      `/${"a".repeat(5000)}`,
      `/${"a".repeat(9000)}`,
      `/root/${encodeURIComponent("é".repeat(2100))}`, // 4200 bytes of UTF-8, over the 4096-byte limit
      "%zz",
    ];
    for (const p of badPaths) {
      out.push({
        name: `upload path=${p.slice(0, 30)}`,
        method: "PUT",
        path: `${sb}/files?path=${p}`,
        headers: octets,
        body: "data",
      });
      out.push({
        name: `download path=${p.slice(0, 30)}`,
        method: "GET",
        path: `${sb}/files?path=${p}`,
      });
    }
    for (const [what, q] of [
      ["no path", ""],
      ["path twice", "?path=/a&path=/b"],
      ["path[]", "?path[]=/a"],
      ["path[x]", "?path[x]=/a"],
    ])
      for (const method of ["PUT", "GET"])
        out.push({
          name: `${method} files: ${what}`,
          method,
          path: `${sb}/files${q}`,
          headers: method === "PUT" ? octets : {},
          body: method === "PUT" ? "x" : undefined,
        });
    // Paths that are odd but legal in the guest: answered normally, never with a 500.
    for (const p of [
      "/root/../tmp/dotdot.txt",
      "/tmp//double",
      "/tmp/sp%20ace",
      "/tmp/%E2%98%83",
      "/tmp/%ED%A0%80", // invalid UTF-8 once decoded
    ])
      out.push({
        name: `upload legal odd path=${p}`,
        method: "PUT",
        path: `${sb}/files?path=${p}`,
        headers: octets,
        body: "ok",
        ok: [204],
      });
    // A request line past Node's 16 KiB header limit: refused by the HTTP parser.
    out.push({
      name: "URL of 20 KiB",
      method: "GET",
      path: `${sb}/files?path=/${"a".repeat(20 * 1024)}`,
      status: 431,
    });
    // Wrong methods and unknown routes.
    for (const [method, path] of <[string, string][]>[
      ["PATCH", "/v1/sandboxes"],
      ["PUT", `${sb}`],
      ["GET", `${sb}/exec`],
      ["DELETE", `${sb}/files?path=/x`],
      ["POST", "/v1/capacity"],
      ["GET", "/v2/sandboxes"],
      ["GET", "/v1/sandboxes/a/b/c/d"],
    ])
      out.push({ name: `${method} ${path.slice(0, 40)}`, method, path });
    return out;
  }

  /**
   * Answers whose body is not the contract's: Fastify answers some framework-level errors
   * itself (an id over its 100-character route parameter limit, a malformed %-escape in
   * the URL, an unparsable request line) with its own `code`s or none. Collected by the
   * first test, asserted by the test below.
   */
  const nonConforming: string[] = [];

  it("answers every malformed request with a 4xx, never a 500, with bounded memory", async () => {
    const rssBefore = process.memoryUsage().rss;
    let peak = rssBefore;
    const all = cases();
    const problems: string[] = [];
    const statuses = new Map<number, number>();
    for (const c of all) {
      const a = await send(d.url, c);
      peak = Math.max(peak, process.memoryUsage().rss);
      statuses.set(a.status, (statuses.get(a.status) ?? 0) + 1);
      const label = `${c.name} (${c.method} ${c.path.slice(0, 80)})`;
      if (a.status === 0) {
        // Cut while sending a body past a limit: refused early, which is what we want.
        if (c.status !== 413 && c.status !== 431)
          problems.push(`${label}: connection cut (${a.cut})`);
        continue;
      }
      if (c.status !== undefined) {
        if (a.status !== c.status)
          problems.push(`${label}: ${a.status} instead of ${c.status}: ${a.text.slice(0, 200)}`);
      } else if (!(a.status >= 400 && a.status < 500) && !c.ok?.includes(a.status)) {
        problems.push(`${label}: status ${a.status}: ${a.text.slice(0, 300)}`);
        continue;
      }
      if (a.status < 400) continue;
      let body: { error?: unknown; code?: unknown };
      try {
        body = JSON.parse(a.text);
      } catch {
        problems.push(
          `${label}: ${a.status} with a body that is not JSON: ${a.text.slice(0, 200)}`,
        );
        continue;
      }
      if (typeof body.error !== "string")
        problems.push(`${label}: ${a.status} ${a.text.slice(0, 200)}`);
      else if (typeof body.code !== "string" || !ERROR_CODES.has(body.code))
        nonConforming.push(`${label}: ${a.status} ${a.text.slice(0, 160)}`);
    }
    const grownMiB = (peak - rssBefore) / 2 ** 20;
    console.log(
      `api input: ${all.length} malformed requests; statuses ${JSON.stringify(Object.fromEntries(statuses))}; ${nonConforming.length} with a framework error body; RSS ${(rssBefore / 2 ** 20).toFixed(0)} MiB before, peak +${grownMiB.toFixed(0)} MiB`,
    );
    assert.deepEqual(problems, []);
    // Each of the 256 MiB bodies would show here had it been buffered.
    assert.ok(grownMiB < 128, `RSS grew by ${grownMiB.toFixed(0)} MiB`);
  });

  it("answers framework-level errors with the contract's codes too", () => {
    assert.deepEqual(nonConforming, []);
  });

  it("answers a download of a file that is not a regular file with a 4xx", async () => {
    const answers: string[] = [];
    for (const p of ["/dev/null", "/dev/zero", "/run"]) {
      const a = await send(d.url, {
        name: p,
        method: "GET",
        path: `/v1/sandboxes/${sbx.id}/files?path=${p}`,
      });
      answers.push(`${p}: ${a.status} ${a.text.slice(0, 200)}`);
    }
    console.log(answers.join("\n"));
    assert.ok(
      answers.every((a) => / 4\d\d /.test(a)),
      answers.join("\n"),
    );
  });

  it("keeps working normally afterwards", async () => {
    const r = await sbx.runCode("print(6 * 7)");
    assert.equal(r.stdout, "42\n");
    await sbx.upload("/root/after.txt", "fine");
    assert.equal(Buffer.from(await sbx.download("/root/after.txt")).toString(), "fine");
    const ids = (await Sandbox.list({ host: d.url })).map((s) => s.id);
    assert.deepEqual(ids, [sbx.id], "no malformed request created or forked a sandbox");
    const health = await fetch(`${d.url}/v1/healthz`);
    assert.equal(await health.text(), "ok");
  });
});
