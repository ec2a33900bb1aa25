import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { SandboxRow } from "../store/db.js";
import { toInfo } from "./views.js";

describe("toInfo", () => {
  it("shows a row as the API's SandboxInfo", () => {
    const row: SandboxRow = {
      id: "sbx_1",
      state: "ready",
      template: "default",
      vcpu_count: 1,
      mem_size_mib: 256,
      created_at: 0,
      expires_at: 1000,
      ended_at: null,
      end_reason: null,
      metadata: '{"a":"b"}',
      pid: 7,
      owner: null,
    };
    assert.deepEqual(toInfo(row), {
      id: "sbx_1",
      state: "ready",
      template: "default",
      vcpu_count: 1,
      mem_size_mib: 256,
      created_at: "1970-01-01T00:00:00.000Z",
      expires_at: "1970-01-01T00:00:01.000Z",
      metadata: { a: "b" },
    });
  });
});
