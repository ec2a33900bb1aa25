/**
 * A cleanup stack: every acquired resource registers its undo step the moment it exists;
 * `unwind()` runs them in reverse order, each exactly once, and never throws (failures
 * are collected and reported to the caller's logger).
 */
export type UndoStep = () => void | Promise<void>;

export class CleanupStack {
  private steps: { name: string; undo: UndoStep }[] = [];
  private unwound = false;

  defer(name: string, undo: UndoStep): void {
    if (this.unwound) {
      // A resource acquired after teardown began would leak: undo it at once.
      void Promise.resolve()
        .then(undo)
        .catch(() => {});
      return;
    }
    this.steps.push({ name, undo });
  }

  /** Forget the steps without running them: ownership moved elsewhere. */
  release(): void {
    this.steps = [];
  }

  get size(): number {
    return this.steps.length;
  }

  async unwind(): Promise<{ name: string; error: unknown }[]> {
    this.unwound = true;
    const failures: { name: string; error: unknown }[] = [];
    while (this.steps.length > 0) {
      const step = this.steps.pop();
      if (!step) break;
      try {
        await step.undo();
      } catch (error) {
        failures.push({ name: step.name, error });
      }
    }
    return failures;
  }
}
