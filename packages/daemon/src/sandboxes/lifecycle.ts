/**
 * A sandbox's states, the one table of their legal transitions, and the one writer of a
 * sandbox row's state: every state change goes through `Lifecycle.move`, which checks
 * the edge against the table and then writes the row through the store.
 *
 * `paused` (the VM stopped by QEMU on a full host disk) is the one state kept in memory
 * only: it begins exactly when the host disk is full, where SQLite cannot write
 * (SQLITE_FULL), and no VM outlives the daemon, so a restart has nothing to keep. Its row
 * meanwhile says `ready`, which is what the API shows for such a sandbox.
 *
 *   creating   ─► ready | ended           (ended: the create failed, nothing is left behind)
 *   ready      ─► paused | dead | destroying
 *   paused     ─► ready | dead | destroying   (its VM stopped on a full host disk, resumed)
 *   dead       ─► destroying                (its QEMU exited under it)
 *   destroying ─► ended
 */
import type { SandboxRow, Store } from "../store/db.js";
import { IllegalTransitionError, SandboxNotFoundError } from "./errors.js";

/** The states a sandbox row holds (store/db.ts). */
export type SandboxState = "creating" | "ready" | "dead" | "destroying" | "ended";
/** Those and `paused`, held by the Lifecycle in memory. */
export type LifecycleState = SandboxState | "paused";

export const TRANSITIONS: Readonly<Record<LifecycleState, readonly LifecycleState[]>> = {
  creating: ["ready", "ended"],
  ready: ["paused", "destroying", "dead"],
  paused: ["ready", "destroying", "dead"],
  dead: ["destroying"],
  destroying: ["ended"],
  ended: [],
};

export function canTransition(from: LifecycleState, to: LifecycleState): boolean {
  return TRANSITIONS[from].includes(to);
}

/** States in which a sandbox still holds host resources. */
export const LIVE_STATES: readonly SandboxState[] = ["creating", "ready", "dead", "destroying"];

/** What a state change may also record on the row. */
export interface TransitionExtra {
  pid?: number | null;
  endReason?: string;
}

/** The one writer of sandbox state. */
export class Lifecycle {
  /** Sandboxes in `paused` (their rows say ready). */
  private readonly paused = new Set<string>();

  constructor(private readonly store: Store) {}

  /** A sandbox's state now (undefined: no such row). */
  state(id: string): LifecycleState | undefined {
    const row = this.store.getSandbox(id);
    return row && this.stateOf(row);
  }

  /** The state of a sandbox whose row the caller has read. */
  stateOf(row: SandboxRow): LifecycleState {
    return this.paused.has(row.id) ? "paused" : row.state;
  }

  /** A new sandbox's row, in state creating. */
  begin(row: Omit<SandboxRow, "state">): void {
    this.store.insertSandbox({ ...row, state: "creating" });
  }

  /** A sandbox whose create (or fork) failed before it was ever ready leaves no row. */
  abandon(id: string): void {
    this.store.deleteSandbox(id);
  }

  /** Move sandbox `id` to `to`; throws IllegalTransitionError on an edge the table lacks. */
  move(id: string, to: LifecycleState, extra: TransitionExtra = {}): void {
    const row = this.store.getSandbox(id);
    if (!row) throw new SandboxNotFoundError(id);
    const from = this.stateOf(row);
    if (!canTransition(from, to)) throw new IllegalTransitionError(id, from, to);
    if (to === "paused") {
      this.paused.add(id); // nothing written: the host disk is full
      return;
    }
    this.paused.delete(id);
    if (from === "paused" && to === "ready") return; // the row says ready already
    this.store.setState(id, to, extra);
  }

  /**
   * End a sandbox whatever live state it is in, by the table's edges: a running, paused or
   * dead one passes through destroying. An ended one is left as it is.
   */
  end(id: string, reason: string): void {
    const state = this.state(id);
    if (state === undefined || state === "ended") return;
    if (!canTransition(state, "ended")) this.move(id, "destroying");
    this.move(id, "ended", { endReason: reason });
  }
}
