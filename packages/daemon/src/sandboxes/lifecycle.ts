/**
 * A sandbox's states, the one table of their legal transitions, and the one writer of a
 * sandbox row's state: every state change goes through `Lifecycle.move`, which checks
 * the edge against the table and then writes the row through the store.
 *
 *   creating   ─► ready | ended           (ended: the create failed, nothing is left behind)
 *   ready      ─► paused | dead | destroying
 *   paused     ─► ready | dead | destroying   (its VM stopped on a full host disk, resumed)
 *   dead       ─► destroying                (its QEMU exited under it)
 *   destroying ─► ended
 */
import type { SandboxRow, Store } from "../store/db.js";
import { IllegalTransitionError, SandboxNotFoundError } from "./errors.js";

export type SandboxState = "creating" | "ready" | "paused" | "dead" | "destroying" | "ended";

export const TRANSITIONS: Readonly<Record<SandboxState, readonly SandboxState[]>> = {
  creating: ["ready", "ended"],
  ready: ["paused", "destroying", "dead"],
  paused: ["ready", "destroying", "dead"],
  dead: ["destroying"],
  destroying: ["ended"],
  ended: [],
};

export function canTransition(from: SandboxState, to: SandboxState): boolean {
  return TRANSITIONS[from].includes(to);
}

/** States in which a sandbox still holds host resources. */
export const LIVE_STATES: readonly SandboxState[] = [
  "creating",
  "ready",
  "paused",
  "dead",
  "destroying",
];

/** What a state change may also record on the row. */
export interface TransitionExtra {
  pid?: number | null;
  endReason?: string;
}

/** The one writer of sandbox state. */
export class Lifecycle {
  constructor(private readonly store: Store) {}

  /** A new sandbox's row, in state creating. */
  begin(row: Omit<SandboxRow, "state">): void {
    this.store.insertSandbox({ ...row, state: "creating" });
  }

  /** A sandbox whose create (or fork) failed before it was ever ready leaves no row. */
  abandon(id: string): void {
    this.store.deleteSandbox(id);
  }

  /** Move sandbox `id` to `to`; throws IllegalTransitionError on an edge the table lacks. */
  move(id: string, to: SandboxState, extra: TransitionExtra = {}): void {
    const row = this.store.getSandbox(id);
    if (!row) throw new SandboxNotFoundError(id);
    if (!canTransition(row.state, to)) throw new IllegalTransitionError(id, row.state, to);
    this.store.setState(id, to, extra);
  }

  /**
   * End a sandbox whatever live state it is in, by the table's edges: a running, paused or
   * dead one passes through destroying. An ended one is left as it is.
   */
  end(id: string, reason: string): void {
    const state = this.store.getSandbox(id)?.state;
    if (state === undefined || state === "ended") return;
    if (!canTransition(state, "ended")) this.move(id, "destroying");
    this.move(id, "ended", { endReason: reason });
  }
}
