#!/usr/bin/env bash
# Fetch the JavaScript the website serves itself, from the npm registry, into
# book/assets/vendor/ (a build product: gitignored). Sphinx copies book/assets/ to _static/, and
# _config.yml points myst-nb (nb_ipywidgets_js) and Sphinx (mathjax_path) at these copies, so
# the published pages need no CDN. Idempotent: does nothing when the pinned versions are there.
#   widgets/  @jupyter-widgets/html-manager 1.0.x (renders ipywidgets 8 state; bundles the core
#             controls) and require.js, which loads it
#   mathjax/  MathJax 3 (es5 build: the tex-mml-chtml bundle Sphinx uses by default, the fonts
#             and the components it loads on demand)
set -euo pipefail
cd "$(dirname "$0")/.."
HTML_MANAGER=1.0.15
REQUIREJS=2.3.7
MATHJAX=3.2.2
dest=book/assets/vendor
want="@jupyter-widgets/html-manager@$HTML_MANAGER requirejs@$REQUIREJS mathjax@$MATHJAX"
if [ "$(cat "$dest/VERSIONS" 2>/dev/null)" = "$want" ] && [ -f "$dest/widgets/embed-amd.js" ] \
   && [ -f "$dest/widgets/require.js" ] && [ -f "$dest/mathjax/tex-mml-chtml.js" ]; then
  echo "[site-js] $want (already fetched)"
  exit 0
fi
command -v npm >/dev/null || { echo "[site-js] npm is needed (Debian: apt-get install -y npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[site-js] npm pack $want"
(cd "$tmp" && npm pack --silent "@jupyter-widgets/html-manager@$HTML_MANAGER" "requirejs@$REQUIREJS" \
   "mathjax@$MATHJAX" >/dev/null)
for pkg in hm rq mj; do mkdir -p "$tmp/$pkg"; done
tar xzf "$tmp/jupyter-widgets-html-manager-$HTML_MANAGER.tgz" -C "$tmp/hm"
tar xzf "$tmp/requirejs-$REQUIREJS.tgz" -C "$tmp/rq"
tar xzf "$tmp/mathjax-$MATHJAX.tgz" -C "$tmp/mj"
rm -rf "$dest"
mkdir -p "$dest/widgets" "$dest/mathjax"
# embed-amd.js and the font files its CSS refers to (webpack puts them next to it); not the
# source maps, nor the non-AMD bundles.
find "$tmp/hm/package/dist" -maxdepth 1 -type f \
  \( -name 'embed-amd.js' -o -name '*.woff' -o -name '*.woff2' -o -name '*.ttf' -o -name '*.eot' -o -name '*.svg' \) \
  -exec cp {} "$dest/widgets/" \;
cp "$tmp/rq/package/require.js" "$dest/widgets/require.js"
# MathJax: the bundle plus the directories it loads from at run time (input/output/ui/a11y/sre);
# not the other prebuilt bundles.
mj="$tmp/mj/package/es5"
cp "$mj/tex-mml-chtml.js" "$dest/mathjax/"
cp -r "$mj/input" "$mj/output" "$mj/ui" "$mj/a11y" "$mj/sre" "$mj/adaptors" "$dest/mathjax/"
cp "$tmp/mj/package/LICENSE" "$dest/mathjax/LICENSE"
echo "$want" >"$dest/VERSIONS"
echo "[site-js] -> $dest ($(du -sh "$dest" | cut -f1))"
