"""Sample whether a host route exists, every millisecond, inside a namespace.

Run as ``ip netns exec NS python route_sampler.py ADDR OUTFILE``.  Prints
``ready`` once sampling, then writes one line per *transition*:
``<CLOCK_REALTIME seconds> <1|0>`` (present/absent), flushing each, until
SIGTERM.  Netlink via pyroute2 (one socket, this process's only thread).
"""

import signal
import sys
import time

from pyroute2 import IPRoute

addr, out = sys.argv[1], sys.argv[2]
running = True


def _stop(*_):
    global running
    running = False


signal.signal(signal.SIGTERM, _stop)
with IPRoute() as ipr, open(out, "w") as f:
    last = None
    n = 0
    print("ready", flush=True)
    while running:
        present = 1 if ipr.route("dump", table=254, dst=addr, dst_len=32 if "." in addr else 128,
                                 family=2 if "." in addr else 10) else 0
        now = time.time()
        n += 1
        if present != last:
            f.write(f"{now:.6f} {present}\n")
            f.flush()
            last = present
        time.sleep(0.001)
    f.write(f"{time.time():.6f} end {n}\n")
