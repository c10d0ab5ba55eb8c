"""Runs many streams at once, one thread each, and prints `READY` (flushed) once every stream
has received at least `ready_after` tokens: the failover tests kill a router then."""
import threading


def run_concurrently(streams, ready_after, run_one):
    """`run_one(i, stream, note)` runs stream i, calling `note(n)` as n tokens arrive, and
    returns its result; a stream that fails must still call `note(ready_after)`. Returns the
    results in order."""
    results = [None] * len(streams)
    counts = [0] * len(streams)
    lock = threading.Lock()
    ready = threading.Event()

    def noter(i):
        def note(n):
            with lock:
                counts[i] += n
                if not ready.is_set() and all(c >= ready_after for c in counts):
                    ready.set()
                    print("READY", flush=True)
        return note

    def run(i, s):
        results[i] = run_one(i, s, noter(i))

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
