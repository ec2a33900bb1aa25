/**
 * Crash points for fault tests: with PODFLARE_CRASH_AT=<name> (config.crashAt, armed by
 * startDaemon), the daemon kills itself with SIGKILL when it reaches that point, exactly
 * as `kill -9` would at that instant. Unarmed (always, outside tests), a crash point is
 * one comparison.
 */
let armed: CrashPoint | null = null;

export type CrashPoint =
  | "create:admitted"
  | "create:vm-started"
  | "create:live"
  | "fork:admitted"
  | "fork:parent-paused"
  | "fork:children-started"
  | "destroy:marked"
  | "destroy:vm-gone";

export const CRASH_POINTS: readonly CrashPoint[] = [
  "create:admitted",
  "create:vm-started",
  "create:live",
  "fork:admitted",
  "fork:parent-paused",
  "fork:children-started",
  "destroy:marked",
  "destroy:vm-gone",
];

/** Called once, by startDaemon, with the configured point (null: none). */
export function armCrashPoint(name: CrashPoint | null): void {
  armed = name;
}

export function crashPoint(name: CrashPoint): void {
  if (armed !== name) return;
  process.stderr.write(`podflared: crash point ${name} reached: SIGKILL\n`);
  process.kill(process.pid, "SIGKILL");
}
