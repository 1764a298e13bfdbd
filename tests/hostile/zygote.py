"""The hostile-file suite's launcher: imports every entry point once, then runs each request in a fresh
forked child with an address-space limit and a timeout (``conftest.attack``).

One request per line on stdin (JSON: entry, argv, cwd, env, memory_mib, timeout_s, stdout, stderr, sys_path);
one answer per line on stdout (JSON: code, seconds, peak_rss_mib, timed_out). The child is what
``python <script> <argv>`` runs after its imports: ``sys.argv`` set, the entry's ``main()`` called, a
``SystemExit`` its exit code, an uncaught exception Python's traceback on stderr and code 1.
"""

import importlib
import json
import os
import resource
import signal
import sys
import time
import traceback

ENTRIES = {  # the scripts' own entry functions (sample.py, sweep.py, ... call these)
    "sample": ("lightning_reg.sampling.cli", "main"),
    "sweep": ("lightning_reg.sampling.sweep", "main"),
    "evaluate": ("lightning_reg.metrics.evaluate", "main"),
    "train": ("lightning_reg.cli", "main"),
    "train_classifier": ("lightning_reg.cli", "classifier_main"),
    "fronts": ("lightning_reg.metrics.fronts", "main"),
}


def vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.update(request.get("env") or {})
    sys.path[:0] = request.get("sys_path") or []
    stdin = os.open(os.devnull, os.O_RDONLY)  # a prompt on the terminal reads end-of-file, never a request line
    os.dup2(stdin, 0)
    os.close(stdin)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    budget = request["memory_mib"] << 20  # on top of what the imports already mapped
    limit = vm_size_bytes() + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module, name = ENTRIES[request["entry"]]
    main = getattr(importlib.import_module(module), name)
    sys.argv = [f"{request['entry']}.py", *request["argv"]]
    code = 0
    try:
        main()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if not isinstance(err.code, (int, type(None))):
            print(err.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what Python prints for an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for module, _ in ENTRIES.values():
        importlib.import_module(module)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                child(request)
            finally:
                os._exit(70)
        deadline, timed_out = start + request["timeout_s"], False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "timed_out": timed_out,
                          "peak_rss_mib": usage.ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    serve()
