package image

import (
	"encoding/binary"
	"fmt"
	"io"
)

// padInodeBitmaps sets the unused tail bits of every inode bitmap, as mke2fs does.
// tar2ext4 leaves them clear; the kernel ignores them, but e2fsck reports each group,
// and an operator checking a root filesystem should see it clean.
//
// It reads the layout tar2ext4 writes: no 64bit feature (32-byte group descriptors), the
// descriptor table in the block after the superblock.
func padInodeBitmaps(f io.ReaderAt, w io.WriterAt) error {
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return fmt.Errorf("reading the superblock: %w", err)
	}
	le := binary.LittleEndian
	blocks := int64(le.Uint32(sb[0x04:]))
	firstBlock := int64(le.Uint32(sb[0x14:]))
	blockSize := int64(1024) << le.Uint32(sb[0x18:])
	blocksPerGroup := int64(le.Uint32(sb[0x20:]))
	inodesPerGroup := int64(le.Uint32(sb[0x28:]))
	const incompat64bit = 0x80
	if le.Uint32(sb[0x60:])&incompat64bit != 0 || blocksPerGroup == 0 {
		return fmt.Errorf("unexpected ext4 layout from the writer")
	}
	if inodesPerGroup >= blockSize*8 {
		return nil // no padding: the bitmap is full width
	}
	groups := (blocks - firstBlock + blocksPerGroup - 1) / blocksPerGroup
	gdt := make([]byte, groups*32)
	if _, err := f.ReadAt(gdt, (firstBlock+1)*blockSize); err != nil {
		return fmt.Errorf("reading group descriptors: %w", err)
	}
	bitmap := make([]byte, blockSize)
	for g := int64(0); g < groups; g++ {
		at := int64(le.Uint32(gdt[g*32+4:])) * blockSize
		if _, err := f.ReadAt(bitmap, at); err != nil {
			return fmt.Errorf("reading inode bitmap of group %d: %w", g, err)
		}
		for bit := inodesPerGroup; bit < blockSize*8; bit++ {
			bitmap[bit/8] |= 1 << (bit % 8)
		}
		if _, err := w.WriteAt(bitmap, at); err != nil {
			return err
		}
	}
	return nil
}
