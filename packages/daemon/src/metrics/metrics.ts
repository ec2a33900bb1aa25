/** Prometheus metrics of the daemon (prom-client), served at /metrics. */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";

const LATENCY_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export class Metrics {
  readonly registry = new Registry();
  readonly createSeconds = new Histogram({
    name: "podflare_create_seconds",
    help: "Sandbox create latency inside the daemon, by whether the warm pool had a VM",
    labelNames: ["result"] as const,
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly poolReady = new Gauge({
    name: "podflare_pool_ready",
    help: "Warm VMs ready to hand out",
    registers: [this.registry],
  });
  readonly poolTarget = new Gauge({
    name: "podflare_pool_target",
    help: "Warm VMs the pool keeps",
    registers: [this.registry],
  });
  readonly poolRefilling = new Gauge({
    name: "podflare_pool_refilling",
    help: "Pool restores in flight",
    registers: [this.registry],
  });
  readonly refillSeconds = new Histogram({
    name: "podflare_pool_refill_seconds",
    help: "Time to restore and warm one pool VM",
    buckets: LATENCY_BUCKETS,
    registers: [this.registry],
  });
  readonly restores = new Counter({
    name: "podflare_restores_total",
    help: "VM restores from a template snapshot, by result",
    labelNames: ["result"] as const,
    registers: [this.registry],
  });
  readonly templateBuilds = new Counter({
    name: "podflare_template_builds_total",
    help: "Template snapshots built",
    registers: [this.registry],
  });
  readonly sandboxesRunning = new Gauge({
    name: "podflare_sandboxes_running",
    help: "Sandboxes running for their users (as /v1/capacity's running)",
    registers: [this.registry],
  });
  readonly streamsOpen = new Gauge({
    name: "podflare_streams_open",
    help: "Exec responses and downloads in progress (sandboxes/stream-budget.ts)",
    registers: [this.registry],
  });
  readonly streamBufferedBytes = new Gauge({
    name: "podflare_stream_buffered_bytes",
    help: "Bytes open streams hold unread in the daemon",
    registers: [this.registry],
  });
  readonly streamsRefused = new Counter({
    name: "podflare_streams_refused_total",
    help: "Streams refused at open (429 too_many_streams), by the bound that refused them",
    labelNames: ["bound"] as const,
    registers: [this.registry],
  });
  readonly streamsTruncated = new Counter({
    name: "podflare_streams_truncated_total",
    help: "Exec streams whose output was dropped because their reader lagged, by bound",
    labelNames: ["bound"] as const,
    registers: [this.registry],
  });
  readonly streamDroppedBytes = new Counter({
    name: "podflare_stream_dropped_bytes_total",
    help: "Exec output dropped because its reader lagged past a bound",
    registers: [this.registry],
  });
  readonly streamPeakBytes = new Histogram({
    name: "podflare_stream_peak_buffered_bytes",
    help: "The most each exec stream held unread in the daemon at once",
    buckets: [16384, 65536, 262144, 1048576, 2097152, 4194304, 8388608],
    registers: [this.registry],
  });

  /** Read at each scrape: what templates and forks hold (set by the daemon's wiring). */
  holds: () => { templates: number; templatesMib: number; forksMib: number } = () => ({
    templates: 0,
    templatesMib: 0,
    forksMib: 0,
  });
  readonly templates: Gauge = new Gauge({
    name: "podflare_templates",
    help: "VM templates this daemon holds (one per shape; capped by PODFLARE_MAX_TEMPLATES)",
    registers: [this.registry],
    collect: (): void => this.templates.set(this.holds().templates),
  });
  readonly templatesMib: Gauge = new Gauge({
    name: "podflare_templates_memory_mib",
    help: "Memory budget (MiB) held by templates' memory files and their builds",
    registers: [this.registry],
    collect: (): void => this.templatesMib.set(this.holds().templatesMib),
  });
  readonly forksMib: Gauge = new Gauge({
    name: "podflare_forks_memory_mib",
    help: "Memory budget (MiB) held by forks in progress (the parent's pages, buffered until every child has its copy)",
    registers: [this.registry],
    collect: (): void => this.forksMib.set(this.holds().forksMib),
  });
  /** Read at each scrape: the disk layers forks froze that VMs still stack. */
  forkLayers: () => Promise<{ count: number; bytes: number }> = async () => ({
    count: 0,
    bytes: 0,
  });
  readonly forkLayersGauge: Gauge = new Gauge({
    name: "podflare_fork_layers",
    help: "Disk layers frozen by forks that VMs still stack (freed with the last VM of the lineage stacking each)",
    registers: [this.registry],
    collect: async (): Promise<void> => this.forkLayersGauge.set((await this.forkLayers()).count),
  });
  readonly forkLayersBytes: Gauge = new Gauge({
    name: "podflare_fork_layers_bytes",
    help: "Host disk (bytes allocated) taken by the disk layers forks froze that VMs still stack",
    registers: [this.registry],
    collect: async (): Promise<void> => this.forkLayersBytes.set((await this.forkLayers()).bytes),
  });
  readonly templateEvictions = new Counter({
    name: "podflare_template_evictions_total",
    help: "Unused templates evicted to make room for another shape's",
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: "podflared_" });
  }

  async render(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
