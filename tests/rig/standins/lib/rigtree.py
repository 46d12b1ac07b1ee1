# Git history of the stand-in source trees (make-klipper-tree, make-katapult-tree).
# Python 3.11 standard library only. See ../README.md.
#
# The whole history (one commit, an annotated tag, N commits to docs/Changes.md) is
# written by one `git fast-import`, because process starts are dear in the rig guest.
# Identities and dates are fixed, so the same files and arguments give the same hashes.
import os
import subprocess

BASE_TIME = 1732170000
IDENT = "kflash rig <rig@kflash.invalid>"


def data(text):
    raw = text.encode()
    return b"data %d\n" % len(raw) + raw + b"\n"


def commit(mark, when, message, changes, parent=None):
    out = b"commit refs/heads/master\nmark :%d\n" % mark
    for role in (b"author", b"committer"):
        out += b"%s %s %d +0000\n" % (role, IDENT.encode(), when)
    out += data(message)
    if parent:
        out += b"from :%d\n" % parent
    for path, (exe, text) in sorted(changes.items()):
        out += b"M %s inline %s\n" % (b"100755" if exe else b"100644", path.encode()) + data(text)
    return out


def create(dest, files, message, tag, tag_message, commits, describe=True):
    """Writes files (path -> (executable, text)) to dest, a new git repository on
    branch master: the files as one commit, an annotated tag, then `commits` commits
    that each add a line to docs/Changes.md. Prints `git describe` unless describe
    is false."""
    changes = "# Changes\n\n"
    files = dict(files)
    files["docs/Changes.md"] = (False, changes)
    stream = commit(1, BASE_TIME, message, files)
    stream += b"tag %s\nfrom :1\ntagger %s %d +0000\n" % (tag.encode(), IDENT.encode(), BASE_TIME)
    stream += data(tag_message)
    for i in range(1, commits + 1):
        changes += "- rig change %d\n" % i
        stream += commit(i + 1, BASE_TIME + 60 * i, "docs: rig change %d" % i,
                         {"docs/Changes.md": (False, changes)}, parent=i)
    files["docs/Changes.md"] = (False, changes)

    for path, (exe, text) in files.items():
        full = os.path.join(dest, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
        if exe:
            os.chmod(full, 0o755)
    subprocess.run(["git", "init", "-q", "-b", "master", dest], check=True)
    with open(os.path.join(dest, ".git", "config"), "a") as f:
        f.write("[user]\n\tname = kflash rig\n\temail = rig@kflash.invalid\n")
    subprocess.run(["git", "-C", dest, "fast-import", "--quiet"], input=stream, check=True)
    subprocess.run(["git", "-C", dest, "reset", "-q"], check=True)  # index = HEAD = work tree
    if describe:
        subprocess.run(["git", "-C", dest, "describe", "--always", "--tags", "--long", "--dirty"],
                       check=True)
