"""Execute the notebooks in order and write the report (executed notebooks + HTML + index).

    python -m routerlib.report [--notebooks notebooks] [--out build/report] [--timeout 1800]
                               [--only NN] [--pdf auto|on|off]

Each notebook picks its sizes itself: full sizes on a GPU, small ones on a CPU (where results
measured on a GPU are read from results/ and rendered instead).
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def notebook_paths(folder: Path) -> list[Path]:
    """The numbered notebooks (NN_name.ipynb) in order."""
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return paths


def execute_notebook(path: Path, out_dir: Path | None = None, timeout: int = 1800):
    """Run every cell of `path` top to bottom in a fresh kernel (cwd = the notebook's folder).
    Returns the executed NotebookNode; raises nbclient's CellExecutionError on the first failure."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_root = str(ROOT)
    os.environ["PYTHONPATH"] = env_root + os.pathsep + os.environ.get("PYTHONPATH", "")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / path.name)
    return nb


# One sentence introducing each notebook on the index page, by its number.
INTROS: dict[str, str] = {
    "01": "The PyTorch reference router step by step: the bytes and FLOPs of each stage, its "
          "invariants, capacity and drop policies, and the baseline measured on a GPU.",
    "02": "The Triton kernels that replace it (route, dispatch, combine, fused experts), each "
          "checked against the reference and timed against torch.compile and the peers.",
    "03": "Every load-balancing strategy (auxiliary losses, bias update, expert choice) on a "
          "small MoE language model trained on real text, with its expert loads and drops.",
    "04": "What lower precision costs in routing decisions and layer output (router int8/fp8, "
          "quantized token payload, fp8 experts), and what it saves.",
    "05": "Expert parallelism over torch.distributed: bytes on the wire, a check on CPU ranks, "
          "and the simulator's plan for 8-64 GPUs.",
    "06": "The summary: what was gained over the reference and the peers, read from the "
          "committed results, then each phase's challenges, trade-offs, usage and limits.",
}


def notebook_intro(stem: str, nb=None) -> str:
    """The index's sentence for a notebook: INTROS by its number, else the first sentence of
    the notebook's first paragraph after its heading ('' if neither)."""
    if stem[:2] in INTROS:
        return INTROS[stem[:2]]
    for cell in (nb.cells if nb is not None else []):
        if cell.cell_type != "markdown":
            continue
        text = " ".join(line.strip() for line in cell.source.splitlines()
                        if line.strip() and not line.startswith("#"))
        if text:
            end = text.find(". ")
            return text if end < 0 else text[:end + 1]
    return ""


def notebook_title(nb) -> str:
    """The text of the notebook's first markdown heading ('' if it has none)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


def index_html(rows: list[tuple], pdf: bool = False) -> str:
    """The report's front page: a title and one entry per notebook. Each row is
    (stem, title, seconds) or (stem, title, seconds, intro sentence); pdf: link NN_name.pdf."""
    items = []
    for stem, title, dt, *rest in rows:
        intro = rest[0] if rest else ""
        items.append(
            f'  <li><a href="{html.escape(stem)}.html">{html.escape(title or stem)}</a>'
            f" <small>({html.escape(stem)}.ipynb, executed in {dt:.0f} s"
            + (f', <a href="{html.escape(stem)}.pdf">PDF</a>' if pdf else "") + ")</small>"
            + (f"<br>{html.escape(intro)}" if intro else "") + "</li>")
    body = "\n".join(items)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            "<title>routerlib report</title></head>\n<body>\n"
            "<h1>routerlib report: Mixture-of-Experts routing, reference and Triton kernels</h1>\n"
            "<p>The notebooks in order, executed by <code>make report</code>: on a GPU they "
            "measure, on a CPU they run at toy sizes and render the results committed under "
            "<code>results/</code>. Start with the final report (06) for the summary.</p>\n"
            f"<ol>\n{body}\n</ol>\n</body></html>\n")


def write_html(nb, dest: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    dest.write_text(body, encoding="utf-8")


def find_chromium() -> str | None:
    """A chromium binary for the PDFs (ROUTERLIB_CHROMIUM, else `chromium` on the PATH), or None
    when there is none or Playwright (which drives it) is not installed."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("playwright") is None:
        return None
    path = os.environ.get("ROUTERLIB_CHROMIUM") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


def write_pdfs(html_paths: list[Path], chromium: str) -> list[Path]:
    """Print each HTML page to a PDF beside it (A4 landscape) with a headless chromium."""
    from playwright.sync_api import sync_playwright

    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox"])
        page = browser.new_page()
        for src in html_paths:
            page.goto(src.resolve().as_uri(), wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_timeout(300)  # images decoded
            dest = src.with_suffix(".pdf")
            page.pdf(path=str(dest), format="A4", landscape=True, print_background=True)
            out.append(dest)
        browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--notebooks", type=Path, default=ROOT / "notebooks")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "report")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    ap.add_argument("--only", default=None, help="run only notebooks whose name contains this")
    ap.add_argument("--pdf", choices=("auto", "on", "off"), default="auto",
                    help="a PDF of each notebook beside its HTML (needs chromium + playwright; "
                         "auto: when found)")
    args = ap.parse_args(argv)

    paths = notebook_paths(args.notebooks)
    if args.only:
        paths = [p for p in paths if args.only in p.name]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in paths:
        t0 = time.perf_counter()
        print(f"[report] executing {path.name} ...", flush=True)
        nb = execute_notebook(path, args.out, args.timeout)
        write_html(nb, args.out / (path.stem + ".html"))
        dt = time.perf_counter() - t0
        print(f"[report]   done in {dt:.0f} s -> {args.out / path.name}", flush=True)
        rows.append((path.stem, notebook_title(nb), dt, notebook_intro(path.stem, nb)))
    chromium = find_chromium() if args.pdf != "off" else None
    if chromium:
        pdfs = write_pdfs([args.out / f"{r[0]}.html" for r in rows], chromium)
        print(f"[report] wrote {len(pdfs)} PDFs beside the HTML pages")
    elif args.pdf == "on":
        raise SystemExit("--pdf on: no chromium (set ROUTERLIB_CHROMIUM, or run "
                         "scripts/install_browser.sh) or no playwright package")
    else:
        print("[report] no PDFs: chromium or playwright not found (HTML only)")
    (args.out / "index.html").write_text(index_html(rows, pdf=bool(chromium)), encoding="utf-8")
    print(f"[report] wrote {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
