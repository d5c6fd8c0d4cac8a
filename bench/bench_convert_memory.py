"""Peak memory of `zoo convert` on one file (docs/RESULTS.md section 7).

Make the 410 MB inputs once:
    python -c "import torch; m = torch.nn.Sequential(*[torch.nn.Linear(3200, 3200) for _ in range(10)]); \
               torch.save(m, 'module.pt'); torch.save(m.state_dict(), 'state.pt')"
Then, for the tree to measure:
    PYTHONPATH=<tree> python bench/bench_convert_memory.py module.pt out.safetensors
Prints ru_maxrss and the peaks of RssAnon / RssFile (/proc/self/status, sampled every 10 ms).
"""
import resource, sys, threading, time
peaks = {"RssAnon": 0, "RssFile": 0}
stop = False
def sample():
    while not stop:
        for ln in open("/proc/self/status"):
            k = ln.split(":")[0]
            if k in peaks:
                peaks[k] = max(peaks[k], int(ln.split()[1]) // 1024)
        time.sleep(0.01)
from tswitch_ray.zoo.convert import convert_checkpoint
base = {k: 0 for k in peaks}
for ln in open("/proc/self/status"):
    k = ln.split(":")[0]
    if k in base: base[k] = int(ln.split()[1]) // 1024
th = threading.Thread(target=sample, daemon=True); th.start()
t0 = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], trust_pickle=True)
stop = True; th.join()
print(f"{sys.argv[1]}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (after imports: anon {base['RssAnon']}, file {base['RssFile']} MiB); sampled peaks anon {peaks['RssAnon']} MiB, file-backed {peaks['RssFile']} MiB; {time.perf_counter() - t0:.1f} s")
