/**
 * How many VMs to start now to refill the pool: a pure function of the counts, so the
 * policy is unit-tested without VMs. Misses waiting for a restore slot go first; refills
 * use what is left, and back off after repeated failures.
 */
export interface PoolCounts {
  target: number;
  ready: number;
  /** Refill restores in flight. */
  refilling: number;
  /** All restores in flight (refills and misses), against `maxConcurrent`. */
  restoring: number;
  /** Misses waiting for a restore slot. */
  waitingMisses: number;
  maxConcurrent: number;
  /** Consecutive refill failures; refilling pauses while `backoffUntil` is in the future. */
  backoffUntil: number;
  now: number;
}

export function refillsToStart(c: PoolCounts): number {
  if (c.now < c.backoffUntil) return 0;
  const missing = c.target - c.ready - c.refilling;
  const freeSlots = c.maxConcurrent - c.restoring - c.waitingMisses;
  return Math.max(0, Math.min(missing, freeSlots));
}

/** Exponential backoff after refill failures: 0.5 s, 1 s, 2 s ... capped at 30 s. */
export function backoffMs(consecutiveFailures: number): number {
  if (consecutiveFailures <= 0) return 0;
  return Math.min(30_000, 500 * 2 ** (consecutiveFailures - 1));
}

/** The default pool size for a host: two warm VMs per core, between 2 and 8. */
export function defaultPoolSize(cores: number): number {
  return Math.max(2, Math.min(8, 2 * cores));
}
