// Package overlay owns every mount a builder makes: the read-only NFS mount
// of a generation (MountNFS, the one place NFS options are written), the
// overlayfs on the store directory (Mount), reading the kernel's mount table
// (ReadMountInfo) and the atomic replacement of one overlay by the next
// (Swap).
//
// Every function here needs CAP_SYS_ADMIN in the caller's mount namespace,
// except the parsers. Nothing keeps state in memory between calls: the
// kernel's mount table is the state, so a restarted agent finds its mounts
// with ReadMountInfo and TopMount.
//
// Paths given to this package must be absolute and free of the characters
// overlayfs and the NFS mount data cannot carry unambiguously: ',', '\\',
// newline, and ':' in overlay layer paths. Nix store paths never contain
// them.
package overlay
