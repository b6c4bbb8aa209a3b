"""Rules producing and consuming tree artifacts (ctx.actions.declare_directory)."""

def _make_tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.name)
    args = ctx.actions.args()
    args.add(out.path)
    args.add(ctx.file.src.path)
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [ctx.file.src],
        arguments = [args],
        mnemonic = "MakeTree",
        progress_message = "Making tree %s" % out.short_path,
        command = """
set -eu
d=$1
src=$2
mkdir -p "$d/a/b/c" "$d/bin" "$d/data/x" "$d/data/y/z"
for i in 1 2 3 4 5; do
    printf 'file %s\\n' "$i" > "$d/a/f$i.txt"
    printf 'deeper %s\\n' "$i" > "$d/a/b/c/g$i.txt"
done
cp "$src" "$d/data/x/copy_of_src.txt"
printf 'same content\\n' > "$d/data/y/dup1.txt"
printf 'same content\\n' > "$d/data/y/z/dup2.txt"
: > "$d/data/empty.txt"
awk 'BEGIN { for (i = 0; i < 8192; i++) printf "row %06d of the tree artifact\\n", i }' > "$d/data/rows.txt"
printf '#!/bin/sh\\necho "hello from a tree artifact: $*"\\n' > "$d/bin/hello.sh"
chmod 0755 "$d/bin/hello.sh"
""",
    )
    return [DefaultInfo(files = depset([out]))]

make_tree = rule(
    implementation = _make_tree_impl,
    attrs = {
        "src": attr.label(allow_single_file = True, mandatory = True),
    },
)

def _tree_manifest_impl(ctx):
    out = ctx.actions.declare_file(ctx.attr.name + ".txt")
    tree = ctx.file.tree
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [tree],
        arguments = [tree.path, out.path],
        mnemonic = "TreeManifest",
        progress_message = "Listing tree %s" % tree.short_path,
        command = """
set -eu
out=$PWD/$2
cd "$1"
# (No mode column: Bazel marks every output executable, and whether an input
# shows up as executable depends on the strategy.)
find -L . -type f | LC_ALL=C sort | while read -r f; do
    printf '%s %s\\n' "$(wc -c < "$f")" "$f"
done > "$out"
find -L . -type f | LC_ALL=C sort | xargs sha256sum >> "$out"
""",
    )
    return [DefaultInfo(files = depset([out]))]

tree_manifest = rule(
    implementation = _tree_manifest_impl,
    attrs = {
        "tree": attr.label(allow_single_file = True, mandatory = True),
    },
)

def _tree_upper_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.name)
    tree = ctx.file.tree
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [tree],
        arguments = [tree.path, out.path],
        mnemonic = "TreeUpper",
        progress_message = "Transforming tree %s" % tree.short_path,
        command = """
set -eu
in=$1
out=$PWD/$2
cd "$in"
find -L . -type f | LC_ALL=C sort | while read -r f; do
    mkdir -p "$out/upper/$(dirname "$f")"
    tr a-z A-Z < "$f" > "$out/upper/$f"
done
""",
    )
    return [DefaultInfo(files = depset([out]))]

tree_upper = rule(
    implementation = _tree_upper_impl,
    attrs = {
        "tree": attr.label(allow_single_file = True, mandatory = True),
    },
)
