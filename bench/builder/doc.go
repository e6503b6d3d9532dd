// Package builder benchmarks the builder agent in a QEMU guest with the
// kernel NFS client against `strata server` on the host (btrfs central
// store filled with nix-bin):
//
//   - cold start: `strata builder` from nothing to ready (NFS mount,
//     overlay, nix-store --load-db of the whole registration) versus
//     `nix copy --from` an HTTP binary cache (compression=none, served from
//     the host) of the same closure, in the same guest run; the ratio is
//     reported as copy/ready.
//   - rotation to a generation with 1,000 new paths while a statloop stats
//     paths of both generations: time until the swap is done (delta, NFS
//     mount, invalidation, swap), total time (plus the import), and the
//     statloop's failures.
//
// Run as root with `make bench-builder`, or
//
//	go test -tags vm -run '^$' -bench . -benchtime 1x ./bench/builder
//
// The closure is 256 MiB of incompressible files by default
// (STRATA_BENCH_CLOSURE_MB overrides; the figure is ~1 GB): under
// TCG emulation the guest moves ~10 MB/s, so the full size would take
// minutes for nix copy alone. All times are guest times under TCG, far
// slower than real hardware; compare ratios, not absolutes.
package builder
