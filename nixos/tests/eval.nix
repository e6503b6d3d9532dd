# Evaluates ../module.nix with nixpkgs' real module system (lib.evalModules)
# against a small declaration of the NixOS options it sets, and returns
# what a NixOS system would get from it. No nixpkgs needed beyond lib/:
#   nix-instantiate --eval --strict --json nixos/tests/eval.nix \
#     --arg lib 'import /path/to/nixpkgs/lib' --arg machine ./machine.nix
{ lib, machine }:
let
  inherit (lib) mkOption types;
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/0000000000000000000000000000000${toString (builtins.stringLength name)}-${name}";
  };
  pkgs = { coreutils = fakePackage "coreutils"; };

  # The NixOS options the module sets, declared with their NixOS types.
  nixosOptions = {
    options = {
      systemd.services = mkOption {
        type = types.attrsOf (types.submodule {
          options = {
            description = mkOption { type = types.str; default = ""; };
            documentation = mkOption { type = types.listOf types.str; default = [ ]; };
            after = mkOption { type = types.listOf types.str; default = [ ]; };
            wants = mkOption { type = types.listOf types.str; default = [ ]; };
            before = mkOption { type = types.listOf types.str; default = [ ]; };
            wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
            restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
            unitConfig = mkOption {
              type = types.attrsOf (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ]);
              default = { };
            };
            serviceConfig = mkOption {
              type = types.attrsOf (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ]);
              default = { };
            };
          };
        });
        default = { };
      };
      environment.etc = mkOption {
        type = types.attrsOf (types.submodule { options.text = mkOption { type = types.lines; }; });
        default = { };
      };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      networking.firewall.allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    };
  };

  eval = lib.evalModules {
    modules = [ nixosOptions ../module.nix (import machine { inherit fakePackage; }) ];
    specialArgs = { inherit pkgs; };
  };
  c = eval.config;
in
{
  etc = builtins.mapAttrs (_: e: e.text) c.environment.etc;
  services = builtins.mapAttrs (_: s: removeAttrs s [ "restartTriggers" ]) c.systemd.services;
  restartTriggers = builtins.mapAttrs (_: s: s.restartTriggers) c.systemd.services;
  firewall = { tcp = c.networking.firewall.allowedTCPPorts; udp = c.networking.firewall.allowedUDPPorts; };
  kernelModules = c.boot.kernelModules;
  tmpfiles = c.systemd.tmpfiles.rules;
  # The messages of the assertions that fail (NixOS refuses to build the
  # system with any).
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
}
