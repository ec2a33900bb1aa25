import assert from "node:assert/strict";
import { before, describe, it } from "node:test";
import { CREATE_OPTIONS, EXIT_RESULT, RUN_CODE_OPTIONS } from "./options.js";
import { type Fields, loadSpec, pythonJson, type Spec, snakeCase } from "./test-support.js";
import * as wire from "./wire.js";

/** Each table of wire.ts (and of python/podflare/_wire.py), and where the spec defines it. */
const TABLES: Record<string, string> = {
  SANDBOX_INFO_FIELDS: "components.schemas.Sandbox",
  CREATE_SANDBOX_FIELDS: "components.schemas.CreateSandbox",
  EXEC_FIELDS: "components.schemas.Exec",
  EXEC_OUTPUT_EVENT_FIELDS: "components.schemas.ExecEvent.oneOf.0",
  EXEC_EXIT_EVENT_FIELDS: "components.schemas.ExecEvent.oneOf.1",
  EXEC_ERROR_FIELDS: "components.schemas.ExecEvent.oneOf.1.properties.error",
  ERROR_FIELDS: "components.schemas.Error",
  FORK_FIELDS: "paths./v1/sandboxes/{id}/fork.post.requestBody.content.application/json.schema",
  FORK_RESPONSE_FIELDS:
    "paths./v1/sandboxes/{id}/fork.post.responses.201.content.application/json.schema",
  LIST_RESPONSE_FIELDS: "paths./v1/sandboxes.get.responses.200.content.application/json.schema",
};

describe("the SDKs' wire shapes follow spec/openapi.yaml", () => {
  let spec: Spec;
  let python: Record<string, unknown>;
  before(async () => {
    spec = await loadSpec();
    python = await pythonJson(
      "import json, podflare._wire as w\nprint(json.dumps({k: getattr(w, k) for k in dir(w) if k.isupper()}))",
    );
  });

  for (const [table, path] of Object.entries(TABLES)) {
    it(`${table}: the spec's fields, in TypeScript and in Python`, () => {
      const ts = (wire as unknown as Record<string, Fields>)[table];
      assert.deepEqual(ts, spec.fields(path), "wire.ts against the spec");
      assert.deepEqual(python[table], ts, "_wire.py against wire.ts");
    });
  }

  it("Python's table of them all is the same set", () => {
    const fieldTables = Object.keys(python).filter((k) => k.endsWith("_FIELDS"));
    assert.deepEqual(fieldTables.sort(), Object.keys(TABLES).sort());
  });

  it("Sandbox.create's options name CreateSandbox's fields, camelCased (Python: as they are)", () => {
    assert.deepEqual(
      Object.values(CREATE_OPTIONS).sort(),
      Object.keys(wire.CREATE_SANDBOX_FIELDS).sort(),
    );
    for (const [option, field] of Object.entries(CREATE_OPTIONS))
      assert.equal(snakeCase(option), field);
  });

  it("runCode's code and options name Exec's fields, camelCased", () => {
    assert.deepEqual(
      ["code", ...Object.values(RUN_CODE_OPTIONS)].sort(),
      Object.keys(wire.EXEC_FIELDS).sort(),
    );
    for (const [option, field] of Object.entries(RUN_CODE_OPTIONS))
      assert.equal(snakeCase(option), field);
  });

  it("ExecResult holds every field of the exit event (Python: snake_case)", () => {
    const { type, seq, ts, ...rest } = wire.EXEC_EXIT_EVENT_FIELDS;
    assert.deepEqual(Object.keys(EXIT_RESULT).sort(), Object.keys(rest).sort());
    const snake = Object.fromEntries(
      Object.entries(EXIT_RESULT).map(([field, name]) => [field, snakeCase(name)]),
    );
    assert.deepEqual(python.EXIT_RESULT, snake);
  });
});
