import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { SandboxRow } from "../store/db.js";
import { LISTED_STATES, toInfo } from "./views.js";

const row = (state: SandboxRow["state"]): SandboxRow => ({
  id: "sbx_1",
  state,
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
});

describe("toInfo", () => {
  it("shows a sandbox paused for host disk space as ready, as the API always has", () => {
    assert.deepEqual(toInfo(row("paused")), toInfo(row("ready")));
    assert.deepEqual(toInfo(row("ready")), {
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

  it("lists paused sandboxes with the ready ones", () => {
    assert.ok(LISTED_STATES.includes("paused"));
    assert.ok(!LISTED_STATES.includes("destroying"));
  });
});
