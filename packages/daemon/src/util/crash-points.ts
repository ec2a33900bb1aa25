/**
 * Crash points for fault tests: with PODFLARE_CRASH_AT=<name>, the daemon kills itself
 * with SIGKILL when it reaches that point, exactly as `kill -9` would at that instant.
 * Unset (always, outside tests), a crash point is one comparison.
 */
const armed = process.env.PODFLARE_CRASH_AT || null;

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

export function crashPoint(name: CrashPoint): void {
  if (armed !== name) return;
  process.stderr.write(`podflared: crash point ${name} reached: SIGKILL\n`);
  process.kill(process.pid, "SIGKILL");
}
