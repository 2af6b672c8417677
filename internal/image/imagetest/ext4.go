package imagetest

import (
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// Ext4 reads an ext4 image file with debugfs, in user space: tests look inside a
// converted root filesystem without mounting it on the host.
type Ext4 struct {
	T    testing.TB
	Path string
}

// Inode is what debugfs says of one path.
type Inode struct {
	Number, Mode, UID, GID, Links int
	Type                          string // regular, directory, symlink, character special, ...
	Size                          int64
	Target                        string // a symlink's target
	Dev                           string // "01:03" for a device node
}

func (e Ext4) debugfs(cmd string) (string, error) {
	e.T.Helper()
	out, err := exec.Command("debugfs", "-R", cmd, e.Path).CombinedOutput()
	return string(out), err
}

var (
	reInode = regexp.MustCompile(`Inode: (\d+)\s+Type: ([a-z ]+?)\s+Mode:\s+(\d+)`)
	reUser  = regexp.MustCompile(`User:\s+(\d+)\s+Group:\s+(\d+).*Size: (\d+)`)
	reLinks = regexp.MustCompile(`Links: (\d+)`)
	reFast  = regexp.MustCompile(`Fast link dest: "(.*)"`)
	reDev   = regexp.MustCompile(`Device major/minor number: (\d+:\d+)`)
)

// Stat returns the inode at p, and false when there is none.
func (e Ext4) Stat(p string) (Inode, bool) {
	e.T.Helper()
	out, _ := e.debugfs("stat " + p)
	m := reInode.FindStringSubmatch(out)
	if m == nil {
		return Inode{}, false
	}
	var in Inode
	in.Number, _ = strconv.Atoi(m[1])
	in.Type = strings.TrimSpace(m[2])
	mode, _ := strconv.ParseInt(m[3], 8, 32)
	in.Mode = int(mode)
	if u := reUser.FindStringSubmatch(out); u != nil {
		in.UID, _ = strconv.Atoi(u[1])
		in.GID, _ = strconv.Atoi(u[2])
		in.Size, _ = strconv.ParseInt(u[3], 10, 64)
	}
	if l := reLinks.FindStringSubmatch(out); l != nil {
		in.Links, _ = strconv.Atoi(l[1])
	}
	if l := reFast.FindStringSubmatch(out); l != nil {
		in.Target = l[1]
	}
	if d := reDev.FindStringSubmatch(out); d != nil {
		in.Dev = d[1]
	}
	return in, true
}

// Cat returns a file's content.
func (e Ext4) Cat(p string) string {
	e.T.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+p, e.Path).Output()
	if err != nil {
		e.T.Fatalf("debugfs cat %s: %v", p, err)
	}
	return string(out)
}

// Xattr returns one extended attribute of p.
func (e Ext4) Xattr(p, name string) string {
	e.T.Helper()
	out, _ := e.debugfs("ea_get " + p + " " + name)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	_, v, _ := strings.Cut(lines[len(lines)-1], " = ")
	return strings.Trim(v, `"`)
}

// Check runs e2fsck read-only and fails the test if the filesystem is not clean.
func (e Ext4) Check() {
	e.T.Helper()
	if out, err := exec.Command("e2fsck", "-fn", e.Path).CombinedOutput(); err != nil {
		e.T.Errorf("e2fsck -fn %s: %v\n%s", e.Path, err, out)
	}
}
