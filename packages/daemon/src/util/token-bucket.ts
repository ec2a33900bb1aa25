/**
 * A token bucket: `capacity` tokens, refilled at `perSecond`. Bounds how often something
 * a hostile peer can trigger may happen (log lines, bytes of garbage) without a timer.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;

  constructor(
    readonly capacity: number,
    readonly perSecond: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.tokens = capacity;
    this.last = now();
  }

  /** Take `cost` tokens if there are that many; otherwise take nothing and return false. */
  take(cost = 1): boolean {
    const t = this.now();
    this.tokens = Math.min(this.capacity, this.tokens + ((t - this.last) / 1000) * this.perSecond);
    this.last = t;
    if (this.tokens < cost) return false;
    this.tokens -= cost;
    return true;
  }
}
