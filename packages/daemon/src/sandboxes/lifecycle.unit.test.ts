import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { Store } from "../store/db.js";
import { IllegalTransitionError, PodflareError } from "./errors.js";
import {
  canTransition,
  Lifecycle,
  type LifecycleState,
  type SandboxState,
  TRANSITIONS,
} from "./lifecycle.js";

const STATES = Object.keys(TRANSITIONS) as LifecycleState[];

describe("the lifecycle table", () => {
  it("has exactly these edges", () => {
    const edges = STATES.flatMap((from) => TRANSITIONS[from].map((to) => `${from}->${to}`));
    assert.deepEqual(edges.sort(), [
      "creating->ended",
      "creating->ready",
      "dead->destroying",
      "destroying->ended",
      "paused->dead",
      "paused->destroying",
      "paused->ready",
      "ready->dead",
      "ready->destroying",
      "ready->paused",
    ]);
  });

  it("lets nothing leave ended, and nothing reach creating", () => {
    for (const to of STATES) assert.equal(canTransition("ended", to), false);
    for (const from of STATES) assert.equal(canTransition(from, "creating"), false);
  });
});

describe("Lifecycle", () => {
  const dir = mkdtempSync(join(tmpdir(), "podflare-lifecycle-"));
  const store = new Store(join(dir, "test.db"));
  after(() => {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const lifecycle = new Lifecycle(store);
  let n = 0;
  const insert = (state: SandboxState): string => {
    const id = `sbx_${n++}`;
    store.insertSandbox({
      id,
      state,
      template: "default",
      vcpu_count: 1,
      mem_size_mib: 256,
      created_at: 0,
      expires_at: 1,
      ended_at: null,
      end_reason: null,
      metadata: "{}",
      pid: null,
      owner: null,
    });
    return id;
  };
  /** A sandbox in `state`; a paused one is a ready row moved to paused. */
  const at = (state: LifecycleState): string => {
    if (state !== "paused") return insert(state);
    const id = insert("ready");
    lifecycle.move(id, "paused");
    return id;
  };

  it("writes every legal edge, with its pid and end reason", () => {
    const id = insert("creating");
    lifecycle.move(id, "ready", { pid: 42 });
    lifecycle.move(id, "paused");
    lifecycle.move(id, "ready");
    lifecycle.move(id, "destroying");
    lifecycle.move(id, "ended", { endReason: "destroyed" });
    const row = store.getSandbox(id);
    assert.equal(row?.state, "ended");
    assert.equal(row?.pid, 42);
    assert.equal(row?.end_reason, "destroyed");
    assert.ok(typeof row?.ended_at === "number");
  });

  it("refuses an edge the table lacks with IllegalTransitionError, writing nothing", () => {
    for (const from of STATES) {
      for (const to of STATES) {
        if (canTransition(from, to)) continue;
        const id = at(from);
        assert.throws(
          () => lifecycle.move(id, to),
          (err: unknown) =>
            err instanceof IllegalTransitionError &&
            err instanceof PodflareError &&
            err.code === "internal" &&
            err.sandboxId === id &&
            err.from === from &&
            err.to === to &&
            err.message === `illegal sandbox transition ${from} -> ${to} for ${id}`,
        );
        assert.equal(lifecycle.state(id), from);
      }
    }
  });

  it("keeps paused in memory only: the row says ready, and nothing is written", () => {
    const id = insert("ready");
    store.db.prepare("UPDATE sandboxes SET end_reason = 'marker' WHERE id = ?").run(id);
    // A full host disk: the database refuses every write.
    store.db.exec(
      "CREATE TEMP TRIGGER full BEFORE UPDATE ON sandboxes BEGIN SELECT RAISE(ABORT, 'disk is full'); END",
    );
    try {
      lifecycle.move(id, "paused");
      assert.equal(lifecycle.state(id), "paused");
      assert.equal(store.getSandbox(id)?.state, "ready");
      lifecycle.move(id, "ready");
      assert.equal(lifecycle.state(id), "ready");
    } finally {
      store.db.exec("DROP TRIGGER full");
    }
    lifecycle.move(id, "paused");
    lifecycle.move(id, "dead", { endReason: "exited" });
    assert.equal(store.getSandbox(id)?.state, "dead");
    assert.equal(lifecycle.state(id), "dead");
  });

  it("ends a sandbox from every live state by legal edges", () => {
    for (const from of ["creating", "ready", "paused", "dead", "destroying"] as const) {
      const id = at(from);
      lifecycle.end(id, "the daemon restarted");
      const row = store.getSandbox(id);
      assert.equal(row?.state, "ended", from);
      assert.equal(row?.end_reason, "the daemon restarted");
    }
    const ended = insert("ended");
    lifecycle.end(ended, "again");
    assert.equal(store.getSandbox(ended)?.end_reason, null);
  });
});
