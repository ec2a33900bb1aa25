import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, it } from "node:test";
import { Authenticator } from "../auth/authenticator.js";
import { repoRoot } from "../config/config.js";
import type { SandboxService } from "../sandboxes/service.js";
import { silentLogger } from "../util/logger.js";
import { buildServer } from "./server.js";

/** The (path, method) pairs spec/openapi.yaml documents, read from its indentation. */
async function documentedOperations(): Promise<{ url: string; method: string }[]> {
  const text = await readFile(join(repoRoot, "spec/openapi.yaml"), "utf8");
  const ops: { url: string; method: string }[] = [];
  let path: string | null = null;
  let inPaths = false;
  for (const line of text.split("\n")) {
    if (/^paths:/.test(line)) inPaths = true;
    else if (/^\S/.test(line)) inPaths = false;
    if (!inPaths) continue;
    const p = /^ {2}(\/\S+):\s*$/.exec(line);
    if (p?.[1]) path = p[1].replace(/\{(\w+)\}/g, ":$1");
    const m = /^ {4}(get|post|put|delete|patch):/.exec(line);
    if (m?.[1] && path) ops.push({ url: path, method: m[1].toUpperCase() });
  }
  return ops;
}

describe("spec/openapi.yaml", () => {
  it("documents exactly the routes the server has", async () => {
    const routes: { url: string; method: string }[] = [];
    const app = buildServer({
      service: {} as SandboxService, // routes are only registered here, never called
      auth: new Authenticator(null, []),
      capacity: async () => ({}),
      metrics: async () => ({ contentType: "text/plain", body: "" }),
      log: silentLogger(),
      onRoute: (r) => routes.push(r),
    });
    await app.ready();
    const documented = await documentedOperations();
    const key = (r: { url: string; method: string }) => `${r.method} ${r.url}`;
    const served = routes
      .filter((r) => r.method !== "HEAD")
      .map(key)
      .sort();
    assert.ok(documented.length >= 10);
    assert.deepEqual(documented.map(key).sort(), served);
    await app.close();
  });
});
