# The hosted service's own example, unchanged. Run with the daemon up:
#   PYTHONPATH=python python3 examples/hello.py
from podflare import Sandbox

with Sandbox() as s:
    r = s.run_code("x = 42; import json")
    r2 = s.run_code("print(x, json.dumps({'ok': True}))")
    print(r2.stdout)  # 42 {"ok": true}
