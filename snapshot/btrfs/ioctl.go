package btrfs

import (
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Read-only queries go through two btrfs ioctls (plain syscalls, no cgo);
// every change to the filesystem goes through the btrfs(8) CLI.

const (
	// superMagic is statfs f_type of a btrfs filesystem (BTRFS_SUPER_MAGIC).
	superMagic = 0x9123683E
	// firstFreeObjectID is the inode number of every subvolume's root
	// directory (BTRFS_FIRST_FREE_OBJECTID).
	firstFreeObjectID = 256
	// rootSubvolRdonly is the read-only bit of a root item's flags, which
	// BTRFS_IOC_GET_SUBVOL_INFO reports (BTRFS_ROOT_SUBVOL_RDONLY).
	rootSubvolRdonly = 1 << 0
)

// fsInfoArgs mirrors struct btrfs_ioctl_fs_info_args (1024 bytes).
type fsInfoArgs struct {
	MaxID          uint64
	NumDevices     uint64
	FSID           [16]byte
	NodeSize       uint32
	SectorSize     uint32
	CloneAlignment uint32
	CsumType       uint16
	CsumSize       uint16
	Flags          uint64
	Generation     uint64
	MetadataUUID   [16]byte
	Reserved       [944]byte
}

// ioctlTimespec mirrors struct btrfs_ioctl_timespec (16 bytes with padding).
type ioctlTimespec struct {
	Sec  uint64
	Nsec uint32
	_    uint32
}

// subvolInfoArgs mirrors struct btrfs_ioctl_get_subvol_info_args (504 bytes).
type subvolInfoArgs struct {
	TreeID       uint64
	Name         [256]byte
	ParentID     uint64
	DirID        uint64
	Generation   uint64
	Flags        uint64
	UUID         [16]byte
	ParentUUID   [16]byte
	ReceivedUUID [16]byte
	Ctransid     uint64
	Otransid     uint64
	Stransid     uint64
	Rtransid     uint64
	Ctime        ioctlTimespec
	Otime        ioctlTimespec
	Stime        ioctlTimespec
	Rtime        ioctlTimespec
	Reserved     [8]uint64
}

// ior computes _IOR(0x94, nr, size) as the kernel's asm-generic ioctl.h does.
func ior(nr, size uintptr) uintptr { return 2<<30 | size<<16 | 0x94<<8 | nr }

var (
	iocFSInfo        = ior(31, unsafe.Sizeof(fsInfoArgs{}))
	iocGetSubvolInfo = ior(60, unsafe.Sizeof(subvolInfoArgs{}))
)

func ioctlPath(path string, req uintptr, arg unsafe.Pointer) error {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(arg)); errno != 0 {
		return errno
	}
	return nil
}

// fsID returns the UUID of the btrfs filesystem holding path. Unlike st_dev
// and statfs f_fsid, which differ per subvolume, it is the same for every
// subvolume of one filesystem.
func fsID(path string) ([16]byte, error) {
	var a fsInfoArgs
	if err := ioctlPath(path, iocFSInfo, unsafe.Pointer(&a)); err != nil {
		return [16]byte{}, fmt.Errorf("btrfs fs info %s: %w", path, err)
	}
	return a.FSID, nil
}

// subvolInfo describes the subvolume that contains path.
type subvolInfo struct {
	// ID is the subvolume (tree) id.
	ID uint64
	// ReadOnly is the subvolume's read-only flag.
	ReadOnly bool
	// Created is the subvolume's creation time (otime).
	Created time.Time
	// UUID and ParentUUID identify the subvolume and, for a snapshot, its
	// source.
	UUID, ParentUUID [16]byte
	// ReceivedUUID is non-zero for a subvolume made by btrfs receive.
	ReceivedUUID [16]byte
}

func getSubvolInfo(path string) (subvolInfo, error) {
	var a subvolInfoArgs
	if err := ioctlPath(path, iocGetSubvolInfo, unsafe.Pointer(&a)); err != nil {
		return subvolInfo{}, fmt.Errorf("btrfs subvolume info %s: %w", path, err)
	}
	return subvolInfo{
		ID:           a.TreeID,
		ReadOnly:     a.Flags&rootSubvolRdonly != 0,
		Created:      time.Unix(int64(a.Otime.Sec), int64(a.Otime.Nsec)),
		UUID:         a.UUID,
		ParentUUID:   a.ParentUUID,
		ReceivedUUID: a.ReceivedUUID,
	}, nil
}
