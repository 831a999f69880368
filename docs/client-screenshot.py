# Drives the annotation client under Xvfb like a person: red over the decoy patch (from the
# ground-truth mark), green along the brightest rows of the digit, submit, wait for the chooser,
# and takes the screenshots in docs/. Usage, with `mp up --dir DIR` running and an expert token:
#
#   xvfb-run -a -s "-screen 0 1200x800x24" sh -c '
#     mp-client --addr http://127.0.0.1:50051 --token TOKEN --size 1200x800 & sleep 6
#     xdotool windowfocus $(xdotool search --name "Machine Punishment" | head -1)
#     python3 docs/client-screenshot.py DIR/data 6390 docs [IMAGE_ID]'
#
# The README's pair: a fresh `mp up` project, IMAGE_ID 0/train-03423.
# Needs xdotool, imagemagick and redis-cli (to find the leased image).
import subprocess, time, sys
def sh(*a): return subprocess.run(a, capture_output=True, text=True).stdout.strip()
def x(*a): subprocess.run(["xdotool", *map(str, a)])
data, port, out = sys.argv[1], sys.argv[2], sys.argv[3]
want = sys.argv[4] if len(sys.argv) > 4 else None  # optional image id: skip (S) until it comes
img = sh("redis-cli", "-p", port, "ZRANGE", "mp:leases", "0", "-1").split("\n")[0]
while want and img != want:
    x("key", "s"); time.sleep(1.5)
    img = sh("redis-cli", "-p", port, "ZRANGE", "mp:leases", "0", "-1").split("\n")[0]
print("leased", img)
cls, name = img.split("/")
def raw(path, fmt):
    return subprocess.run(["convert", path, "-depth", "8", f"{fmt}:-"], capture_output=True).stdout
W, H = map(int, sh("identify", "-format", "%w %h", f"{data}/train/{cls}/{name}.png").split())
m = raw(f"{data}/marks/{cls}/{name}.png", "rgb")
g = raw(f"{data}/train/{cls}/{name}.png", "gray")
markpx = [tuple(m[3*i:3*i+3]) for i in range(W*H)]
# image rectangle on screen for a 1200x800 window with the tools panel (measured from a shot)
x0, y0, side = 347.0, 57.0, 735.0
s = side / W
def scr(px, py): return int(x0 + (px + 0.5) * s), int(y0 + (py + 0.5) * s)
def stroke(pts):
    a = scr(*pts[0]); x("mousemove", *a); time.sleep(0.15); x("mousedown", 1); time.sleep(0.1)
    for p in pts[1:]:
        b = scr(*p)
        for i in range(1, 7):
            x("mousemove", a[0] + (b[0]-a[0])*i//6, a[1] + (b[1]-a[1])*i//6); time.sleep(0.05)
        a = b
    x("mouseup", 1); time.sleep(0.2)
red = [(i % W, i // W) for i, p in enumerate(markpx) if p[0] > 128 and p[1] < 100]
xs = [p[0] for p in red]; ys = [p[1] for p in red]
print("red box", min(xs), max(xs), min(ys), max(ys))
for yy in range(min(ys), max(ys) + 1):
    stroke([(min(xs), yy), (max(xs), yy)])
x("key", "g"); time.sleep(0.2)
# green: radius 0 along runs of bright digit pixels in three rows
x("key", "bracketleft"); 
for _ in range(6): x("key", "bracketleft")
rows = sorted(range(H), key=lambda r: -sum(g[r*W+c] > 160 for c in range(W)))[:6]
for r in sorted(rows):
    cols = [c for c in range(W) if g[r*W+c] > 160]
    if len(cols) >= 2: stroke([(cols[0], r), (cols[-1], r)])
x("mousemove", 1100, 300); time.sleep(0.6)
subprocess.run(["import", "-window", "root", f"{out}/client-mark.png"])
x("key", "Return")
for _ in range(60):
    time.sleep(1)
    subprocess.run(["import", "-window", "root", f"{out}/client-choose.png"])
    st = sh("redis-cli", "-p", port, "KEYS", "mp:proposal:*")
    if st and all(sh("redis-cli", "-p", port, "HGET", k, "status") in ("ready", "committing", "committed", "rejected") for k in st.split("\n")):
        time.sleep(1.5)
        subprocess.run(["import", "-window", "root", f"{out}/client-choose.png"])
        break
