# strata built from a source tree, for nixos/tests/strata.nix. vendorHash
# must be updated when go.sum changes (nix-build prints the right one).
{ buildGoModule, src, lib }:
buildGoModule {
  pname = "strata";
  version = "dev";
  inherit src;
  subPackages = [ "cmd/strata" ];
  vendorHash = lib.fakeHash;
  env.CGO_ENABLED = 0;
}
