"""podflare guest agent: serves spec/guest-protocol.md (protocol 1) over virtio-serial.

Two processes, both this package (standard library only; `python3 -m podflare_agent`, or
`python3 /opt/podflare/podflare_agent` in the image):

- The control process (started by init) owns the virtio port: it
  answers hello, ping, restore and file transfers, queues execs, enforces timeouts and
  cancels, and is the only writer to the port. In the guest it lives in its own cgroup
  (protected memory, high CPU weight, oom_score_adj -1000; see `Cgroups`).
- The REPL worker (`--worker`, spawned by the control process over a
  socket pair) runs user code with the ExecRunner below, in the `user` cgroup subtree
  (memory.max, pids.max, low CPU weight), so an out-of-memory kill or a fork bomb ends
  the worker, never the agent. Each exec runs with the worker moved into its own cgroup
  (user/exec-<n>), so a timeout or cancel can kill every process the call started,
  setsid'd or double-forked ones included. The control process relays the worker's
  frames to the host and trusts none of them (user code runs in the worker and can write
  to its socket): every frame is bounded, validated, re-encoded, and output is capped
  again. A worker that dies mid-exec ends that exec with one exit frame saying so, and a
  fresh worker is started.

Threads of the control process:
- main: the dispatcher; runs execs one at a time from a FIFO queue on the worker, times
  them out, interrupts them, kills their cgroups, respawns the worker.
- reader: parses host frames and answers everything but exec itself (ping must be
  answered while user code runs); execs are queued for the dispatcher.
- link: one per worker; relays its frames and notices its death (pidfd).
- one thread per file download, paced by the host's credit window.
Threads of the worker:
- main: runs the exec. User code must run on the main thread because only there can an
  interrupt reach it with SIGINT -> KeyboardInterrupt, which also breaks out of
  time.sleep() and other blocking calls.
- channel: reads the control process's frames (exec, interrupt, reseed).
- watchdog: turns interrupts into SIGINTs for the main thread, repeated every second.
- flusher: forwards captured output at least every few milliseconds.
- fd pump: forwards what child processes (and C code) write to fds 1 and 2.

Modules, one job each:
- protocol: constants, limits, request errors and field checks, framing (FrameParser, FrameWriter)
- runtime: the diagnostic log, helper-thread CPU affinity, /proc writes, the worker's pid
- output: output capture in the worker (OutputCollector, CapturedStream, FdCapture)
- execqueue: the bounded FIFO of execs both processes keep
- worker: the REPL worker process (ExecRunner, WorkerChannel, worker_main)
- cgroups: the guest's cgroup v2 layout and counters (Cgroups)
- supervisor: the worker's life: one process (WorkerProcess: argv, socket, link thread)
  and its supervision (WorkerSupervisor: start with back-off, park, replace, stop)
- scheduler: the control process's exec scheduler (ExecScheduler): queue, timeouts,
  cancels, kills, per-exec cgroups, relaying the worker's frames
- files: file transfer (FileTransfers)
- identity: restore (entropy, clock, hostname, /etc/hosts, machine-id)
- dispatch: the control process (control_main) and its reader (Agent): request routing
- __main__: argument parsing and start-up of either process
Importing any of them has no side effect; the worker imports only what it runs.
"""
