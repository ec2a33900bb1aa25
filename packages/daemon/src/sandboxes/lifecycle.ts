/**
 * The one table of a sandbox's legal state transitions.
 *
 *   creating ──► ready ──► destroying ──► ended
 *       │          │            ▲
 *       │          └─► dead ────┘      (QEMU or the agent died under it)
 *       └──────────────────────────► ended   (boot failed: nothing is left behind)
 */
export type SandboxState = "creating" | "ready" | "dead" | "destroying" | "ended";

export const TRANSITIONS: Readonly<Record<SandboxState, readonly SandboxState[]>> = {
  creating: ["ready", "ended"],
  ready: ["destroying", "dead"],
  dead: ["destroying"],
  destroying: ["ended"],
  ended: [],
};

export function canTransition(from: SandboxState, to: SandboxState): boolean {
  return TRANSITIONS[from].includes(to);
}

/** States in which a sandbox still holds host resources. */
export const LIVE_STATES: readonly SandboxState[] = ["creating", "ready", "dead", "destroying"];
