/**
 * The TypeScript and Python SDKs name the same things one to one: camelCase here,
 * snake_case there (python/tests check each Python call's keywords).
 */
import assert from "node:assert/strict";
import { before, describe, it } from "node:test";
import * as errors from "./errors.js";
import { errorFromResponse, PodflareError } from "./errors.js";
import { DEFAULT_HOST, Http } from "./http.js";
import { Sandbox } from "./sandbox.js";
import { pythonJson, snakeCase } from "./test-support.js";

interface PythonSurface {
  methods: string[];
  staticmethods: string[];
  errors: string[];
  byStatus: Record<string, [string, number, string, string]>;
  execResult: string[];
  hosts: string[];
}

/** Host spellings each SDK resolves (PODFLARE_HOST unset). */
const HOSTS = ["", "127.0.0.1:7070", "http://h:1/", "https://h.example//", "localhost"];

const PYTHON_SURFACE = `
import dataclasses, inspect, json
import podflare
from podflare.errors import error_from_response
from podflare._http import Http
S = podflare.Sandbox
public = [n for n in vars(S) if not n.startswith("_")]
statics = [n for n in public if isinstance(vars(S)[n], (staticmethod, classmethod))]
by_status = {}
for status in range(400, 600):
    e = error_from_response(status, json.dumps({"error": "m", "code": "c"}).encode())
    by_status[status] = [type(e).__name__, e.status, e.code, e.message]
print(json.dumps({
    "methods": sorted(set(public) - set(statics)),
    "staticmethods": sorted(statics),
    "errors": sorted(n for n in podflare.__all__ if inspect.isclass(getattr(podflare, n)) and issubclass(getattr(podflare, n), podflare.PodflareError)),
    "byStatus": by_status,
    "execResult": [f.name for f in dataclasses.fields(podflare.ExecResult)],
    "hosts": [Http(h).host for h in ${JSON.stringify(HOSTS)}],
}))
`;

/** TypeScript's create is Python's constructor (`await using` is its `with`). */
const TS_ONLY: Record<string, string> = { create: "Sandbox(...) itself" };

describe("the two SDKs mirror each other", () => {
  let py: PythonSurface;
  before(async () => {
    delete process.env.PODFLARE_HOST;
    py = await pythonJson<PythonSurface>(PYTHON_SURFACE);
  });

  it("resolves the daemon's address alike (an empty one is the default)", () => {
    assert.deepEqual(
      HOSTS.map((host) => new Http({ host }).host),
      py.hosts,
    );
    assert.equal(py.hosts[0], DEFAULT_HOST);
  });

  it("Sandbox has the same calls (create is Python's constructor)", () => {
    const members = (o: object) =>
      Object.getOwnPropertyNames(o).filter(
        (n) =>
          n !== "constructor" && typeof Object.getOwnPropertyDescriptor(o, n)?.value === "function",
      );
    const statics = members(Sandbox).filter((n) => !(n in TS_ONLY));
    const methods = members(Sandbox.prototype).filter((n) => !(n in TS_ONLY));
    assert.deepEqual(statics.map(snakeCase).sort(), py.staticmethods);
    assert.deepEqual(methods.map(snakeCase).sort(), py.methods);
  });

  it("the same error classes, under the same names", () => {
    const ts = Object.entries(errors)
      .filter(([, v]) => typeof v === "function" && v.prototype instanceof Error)
      .filter(([name, v]) => name === (v as { name: string }).name) // aliases aside
      .map(([name]) => name)
      .sort();
    assert.deepEqual(ts, py.errors);
  });

  it("every HTTP status maps to the same class, with the same status, code and message", () => {
    for (let status = 400; status < 600; status++) {
      const e = errorFromResponse(status, JSON.stringify({ error: "m", code: "c" }));
      assert.ok(e instanceof PodflareError);
      assert.deepEqual(
        [e.name, e.status, e.code, e.message],
        py.byStatus[String(status)],
        `status ${status}`,
      );
    }
  });

  it("ExecResult has the same fields", async () => {
    const { EXIT_RESULT } = await import("./options.js");
    const ts = ["stdout", "stderr", ...Object.values(EXIT_RESULT)];
    assert.deepEqual(ts.map(snakeCase), py.execResult);
  });
});
