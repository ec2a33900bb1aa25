"""The Python half of sdk-parity.e2e.test.ts: the same scenario as its TypeScript half,
printed as one JSON transcript (PODFLARE_HOST says where the daemon is)."""
import json
import sys

import podflare
from podflare import Sandbox

FILE = bytes([0, 255, 1, 254]) + "podflare ✓\n".encode()


def failure(call, hide=None):
    """What a failing call raised: its class, status, code and message."""
    try:
        call()
    except podflare.PodflareError as e:
        message = e.message.replace(hide, "<id>") if hide else e.message
        return {"class": type(e).__name__, "status": e.status, "code": e.code, "message": message}
    return None


def result(r):
    return {
        "stdout": r.stdout,
        "stderr": r.stderr,
        "exit_code": r.exit_code,
        "error": r.error,
        "timed_out": r.timed_out,
        "truncated": r.truncated,
        "cancelled": r.cancelled,
    }


def scenario():
    out = {}
    s = Sandbox(template="default", metadata={"suite": "sdk-parity"}, timeout_ms=600000)
    info = s.info
    out["created"] = {
        "id_prefix": s.id[:4],
        "fields": sorted(info),
        "state": info["state"],
        "template": info["template"],
        "metadata": info["metadata"],
    }
    s.run_code("x = 42; import sys, time")
    out["state_kept"] = result(s.run_code("print(x)"))
    out["streams"] = result(s.run_code("print('out'); print('err', file=sys.stderr)"))
    events = list(s.run_code_stream("print(1); print(2, file=sys.stderr)"))
    out["events"] = [{k: v for k, v in e.items() if k != "ts"} for e in events]
    error = result(s.run_code("1/0"))
    out["error"] = {
        "exit_code": error["exit_code"],
        "name": error["error"]["name"],
        "value": error["error"]["value"],
        "traceback_in_stderr": "ZeroDivisionError" in error["stderr"],
    }
    out["after_error"] = result(s.run_code("print(x)"))
    timeout = result(s.run_code("time.sleep(60)", timeout_ms=1000))
    out["timeout"] = {"exit_code": timeout["exit_code"], "timed_out": timeout["timed_out"]}
    out["after_timeout"] = result(s.run_code("print(x)"))
    out["bash"] = result(s.run_code("echo $((6*7))", language="bash"))
    out["bad_timeout"] = failure(lambda: s.run_code("1", timeout_ms=0))
    s.upload("/root/data/f.bin", FILE)
    out["download_same"] = s.download("/root/data/f.bin") == FILE
    out["seen_by_code"] = result(s.run_code("print(open('/root/data/f.bin','rb').read().hex())"))
    out["missing_file"] = failure(lambda: s.download("/root/nope"))
    [child] = s.fork()
    out["fork"] = {
        "child_is_new": child.id != s.id and child.id.startswith("sbx_"),
        "child_info": {k: child.info[k] for k in ("state", "template", "metadata")},
        "child_state": result(child.run_code("print(x)")),
        "child_file": child.download("/root/data/f.bin") == FILE,
    }
    child.run_code("x = 7")
    out["fork"]["parent_untouched"] = result(s.run_code("print(x)"))
    info = s.get_info()
    out["get_info"] = {"state": info["state"], "metadata": info["metadata"], "same_id": info["id"] == s.id}
    listed = [i["id"] for i in Sandbox.list()]
    out["list"] = {"parent": s.id in listed, "child": child.id in listed}
    child.close()
    child.close()  # idempotent
    out["destroyed"] = failure(child.get_info, hide=child.id)
    out["list_after"] = {"child": child.id in [i["id"] for i in Sandbox.list()]}
    s.close()
    out["unknown"] = failure(lambda: Sandbox.connect("sbx_does_not_exist"))
    return out


if __name__ == "__main__":
    json.dump(scenario(), sys.stdout, ensure_ascii=False, sort_keys=True)
