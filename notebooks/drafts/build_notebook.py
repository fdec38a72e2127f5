"""Build an .ipynb from a percent-format .py (cells split on '# %%'), then execute it."""
import sys, re, nbformat, subprocess, os
src, out = sys.argv[1], sys.argv[2]
text = open(src).read()
cells = []
for chunk in re.split(r"^# %%", text, flags=re.M)[1:]:
    header, _, body = chunk.partition("\n")
    body = body.strip("\n")
    if header.strip().startswith("[markdown]"):
        lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines()]
        cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
    else:
        c = nbformat.v4.new_code_cell(body)
        if "hide" in header:
            c.metadata["jupyter"] = {"source_hidden": True}
            c.metadata["tags"] = ["solution"]
        cells.append(c)
nb = nbformat.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.metadata["language_info"] = {"name": "python"}
nbformat.write(nb, out)
if "--no-exec" not in sys.argv:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error",
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    r = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                        "--inplace", "--ExecutePreprocessor.timeout=900", out], env=env,
                       cwd=os.path.dirname(os.path.abspath(out)))
    sys.exit(r.returncode)
