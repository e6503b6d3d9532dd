# NixOS VM test of services.strata in the nixpkgs test format. It needs
# nixpkgs and KVM, which strata's CI does not have: CI evaluates the module
# (nixos/eval_test.go), it does not boot this. Run it with:
#
#   nix-build -E 'let pkgs = import <nixpkgs> { }; in
#     pkgs.testers.runNixOSTest (import ./nixos/tests/strata.nix {
#       strata = pkgs.callPackage ./nixos/tests/package.nix { src = ./.; }; })'
#
# `central` serves a btrfs central store; `builder` mounts its newest
# generation over NFS on a separate chroot store (/srv/b/nix/store, so the
# test machine's own /nix/store is untouched) and becomes READY.
{ strata }:
{
  name = "strata";

  nodes = {
    central = { pkgs, ... }: {
      imports = [ ../module.nix ];
      virtualisation.emptyDiskImages = [ 1024 ];
      environment.systemPackages = [ pkgs.btrfs-progs pkgs.nix ];
      services.strata.server = {
        enable = true;
        package = strata;
        openFirewall = true;
        apiTokenFile = "/etc/strata-test-token";
        settings = {
          store.root = "/srv/nix";
          # Required with btrfs: on the store's filesystem, outside store.root.
          snapshot.snapshot_dir = "/srv/snapshots";
          publish.interval = "0s";
          api.listen = "0.0.0.0:7480";
          nfs.allow = [ "192.168.1.0/24" ];
        };
      };
      # The central store is created by the test script before the start
      # (so is the snapshot dir: the module's tmpfiles rule made it at boot
      # on the root filesystem, which the btrfs mount on /srv hides).
      systemd.services.strata-server.wantedBy = pkgs.lib.mkForce [ ];
      systemd.services.strata-server.unitConfig.RequiresMountsFor = pkgs.lib.mkForce [ "/srv" ];
      environment.etc."strata-test-token".text = "test-token";
    };

    builder = { pkgs, ... }: {
      imports = [ ../module.nix ];
      environment.systemPackages = [ pkgs.nix ];
      services.strata.builder = {
        enable = true;
        package = strata;
        settings = {
          server.api = "http://central:7480";
          store.dir = "/srv/b/nix/store";
          nix.store = "/srv/b";
          nix.state_dir = "/srv/b/nix/var/nix";
        };
      };
      systemd.services.strata-builder.wantedBy = pkgs.lib.mkForce [ ];
    };
  };

  testScript = ''
    start_all()
    central.wait_for_unit("multi-user.target")
    central.succeed(
        "mkfs.btrfs -f /dev/vdb && mkdir -p /srv && mount /dev/vdb /srv",
        "btrfs subvolume create /srv/nix",
        "mkdir -m 0700 /srv/snapshots",
        "echo hello > /tmp/hello && nix-store --store /srv --add /tmp/hello",
    )
    central.succeed("systemctl start strata-server")
    # Type=notify: start returns after READY=1.
    central.succeed("systemctl is-active strata-server")
    central.wait_until_succeeds("strata status --api unix:/var/lib/strata/server/api.sock | grep -q 'generation'")
    central.succeed("systemctl reload strata-server")
    central.succeed("journalctl -u strata-server | grep -q 'msg=reloaded'")

    builder.wait_for_unit("multi-user.target")
    builder.succeed("systemctl start strata-builder")
    builder.succeed("systemctl is-active strata-builder")
    builder.succeed("grep -q ' /srv/b/nix/store overlay ' /proc/mounts")
    builder.succeed("nix-store --store /srv/b --verify")
  '';
}
