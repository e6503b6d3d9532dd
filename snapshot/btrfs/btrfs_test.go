package btrfs

import (
	"testing"
	"unsafe"
)

// The ioctl argument structs must match the kernel's sizes exactly, or the
// request numbers (which encode the size) are wrong.
func TestIoctlLayout(t *testing.T) {
	if got := unsafe.Sizeof(fsInfoArgs{}); got != 1024 {
		t.Errorf("sizeof(btrfs_ioctl_fs_info_args) = %d, want 1024", got)
	}
	if got := unsafe.Sizeof(subvolInfoArgs{}); got != 504 {
		t.Errorf("sizeof(btrfs_ioctl_get_subvol_info_args) = %d, want 504", got)
	}
	if got := unsafe.Offsetof(subvolInfoArgs{}.Otime); got != 392 {
		t.Errorf("offset of otime = %d, want 392", got)
	}
	// From the kernel headers: BTRFS_IOC_FS_INFO and BTRFS_IOC_GET_SUBVOL_INFO.
	if iocFSInfo != 0x8400941f {
		t.Errorf("BTRFS_IOC_FS_INFO = %#x, want 0x8400941f", iocFSInfo)
	}
	if iocGetSubvolInfo != 0x81f8943c {
		t.Errorf("BTRFS_IOC_GET_SUBVOL_INFO = %#x, want 0x81f8943c", iocGetSubvolInfo)
	}
}
