"""The Python SDK's side of the benchmark: create, exec of print(6*7), destroy, over HTTP.
Prints one JSON object of millisecond samples. Run by bench/bench.ts."""
import json
import sys
import time

sys.path.insert(0, sys.argv[1])
from podflare import Sandbox  # noqa: E402


def ms(t0):
    return (time.perf_counter() - t0) * 1000


def main():
    rounds, execs = int(sys.argv[2]), int(sys.argv[3])
    out = {"create": [], "exec": [], "destroy": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        s = Sandbox()
        out["create"].append(ms(t0))
        print("CREATED", flush=True)
        input()  # the TypeScript side answers once the pool has refilled
        for _ in range(execs):
            t0 = time.perf_counter()
            r = s.run_code("print(6*7)")
            out["exec"].append(ms(t0))
            assert r.stdout == "42\n", r
        t0 = time.perf_counter()
        s.close()
        out["destroy"].append(ms(t0))
        print("ROUND", flush=True)
        input()  # the TypeScript side answers once the pool is full again
    print(json.dumps(out), flush=True)


main()
