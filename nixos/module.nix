# NixOS module for strata: services.strata.server and services.strata.builder.
#
# The units are the shipped ones: ../systemd/strata-{server,builder}.service
# are parsed here and turned into systemd.services (only the executable
# paths change), so both deployments have the same Type=notify, watchdog,
# ordering, credentials and hardening. Settings are typed options built
# from keys.json (the daemons' own key tables): an unknown key or a value
# of the wrong type is an evaluation error naming the option; unset keys
# keep strata's defaults. The rendered config is JSON, which is YAML.
{ config, lib, pkgs, ... }:

let
  inherit (lib) types mkOption mkEnableOption mkIf mkMerge;

  keys = builtins.fromJSON (builtins.readFile ./keys.json);

  duration = types.strMatching "0|([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+";
  # Values strata accepts only from a fixed set.
  enums = {
    "snapshot.backend" = [ "btrfs" "zfs" ];
    "log.level" = [ "debug" "info" "warn" "error" ];
    "rotate.policy" = [ "immediate" "idle" ];
    "swap.method" = [ "auto" "beneath" "propagation" ];
  };
  typeOf = k:
    if enums ? ${k.name} then types.enum enums.${k.name}
    else {
      string = types.str;
      int = types.int;
      duration = duration;
      bool = types.bool;
      list = types.listOf types.str;
    }.${k.kind};
  optionFor = k: mkOption {
    type = types.nullOr (typeOf k);
    default = null;
    description = "${k.usage} (null: strata's default, ${builtins.toJSON k.default}).";
  };

  # Typed options for a key table: "a.b" becomes settings.a.b.
  settingsModule = table:
    let
      parts = k: lib.splitString "." k.name;
      top = builtins.filter (k: builtins.length (parts k) == 1) table;
      nested = builtins.filter (k: builtins.length (parts k) == 2) table;
      sections = lib.unique (map (k: builtins.head (parts k)) nested);
    in
    {
      options = lib.listToAttrs (map (k: lib.nameValuePair k.name (optionFor k)) top)
        // lib.genAttrs sections (s: mkOption {
          type = types.submodule {
            options = lib.listToAttrs (map (k: lib.nameValuePair (builtins.elemAt (parts k) 1) (optionFor k))
              (builtins.filter (k: builtins.head (parts k) == s) nested));
          };
          default = { };
          description = "The ${s}.* keys.";
        });
    };

  # Drop unset (null) keys and sections left empty.
  clean = v:
    if builtins.isAttrs v then
      lib.filterAttrs (_: x: x != null && x != { }) (builtins.mapAttrs (_: clean) v)
    else v;

  # The shipped unit as { Unit = { Key = [ values ]; }; Service = ...; }.
  parseUnit = text:
    let
      lines = map lib.trim (lib.splitString "\n" text);
      step = acc: line:
        if line == "" || lib.hasPrefix "#" line || lib.hasPrefix ";" line then acc
        else if lib.hasPrefix "[" line then acc // { section = lib.removeSuffix "]" (lib.removePrefix "[" line); }
        else
          let
            kv = builtins.match "([^=]+)=(.*)" line;
            k = lib.trim (builtins.elemAt kv 0);
            v = lib.trim (builtins.elemAt kv 1);
            sec = acc.units.${acc.section} or { };
          in
          acc // { units = acc.units // { ${acc.section} = sec // { ${k} = (sec.${k} or [ ]) ++ [ v ]; }; }; };
    in
    (builtins.foldl' step { section = ""; units = { }; } lines).units;

  # strata's unit as systemd.services.<name>, with the executables of this
  # system.
  unitFor = name: package:
    let
      u = parseUnit (builtins.readFile (../systemd + "/${name}.service"));
      exe = builtins.replaceStrings [ "/usr/bin/strata" "/bin/kill" "/bin/mkdir" ]
        [ "${package}/bin/strata" "${pkgs.coreutils}/bin/kill" "${pkgs.coreutils}/bin/mkdir" ];
      words = k: lib.concatMap (lib.splitString " ") (u.Unit.${k} or [ ]);
      one = vs: if builtins.length vs == 1 then builtins.head vs else vs;
    in
    {
      description = builtins.head u.Unit.Description;
      documentation = words "Documentation";
      after = words "After";
      wants = words "Wants";
      before = words "Before";
      wantedBy = lib.concatMap (lib.splitString " ") (u.Install.WantedBy or [ ]);
      unitConfig.RequiresMountsFor = words "RequiresMountsFor";
      serviceConfig = builtins.mapAttrs (_: vs: one (map exe vs)) u.Service;
    };

  port = addr: default:
    if addr == null then default
    else lib.toInt (lib.last (lib.splitString ":" addr));

  common = role: {
    enable = mkEnableOption "the strata ${role}";
    package = mkOption {
      type = types.package;
      description = "The strata package (its bin/strata runs the ${role}).";
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the ${role}'s listening ports (NFS and API on a server, the API on a builder when api.listen is set, gossip when cluster.bind is set).";
    };
    apiTokenFile = mkOption {
      type = types.nullOr (types.strMatching "/.+");
      default = null;
      example = "/run/secrets/strata-api-token";
      description = ''
        File with the API bearer token, as an absolute path string (a Nix path
        literal would copy the secret into the world-readable store; strings are
        not copied). Passed to the service with LoadCredential=.
      '';
    };
    clusterKeyringFile = mkOption {
      type = types.nullOr (types.strMatching "/.+");
      default = null;
      description = "Gossip keyring file (absolute path string, never copied into the store); passed with LoadCredential=.";
    };
    settings = mkOption {
      type = types.submodule (settingsModule keys.${role});
      default = { };
      description = "strata ${role} configuration (see `strata ${role} --help`).";
    };
  };

  credentials = c:
    lib.optional (c.apiTokenFile != null) "strata_api-token:${c.apiTokenFile}"
    ++ lib.optional (c.clusterKeyringFile != null) "strata_cluster.keys:${c.clusterKeyringFile}"
    ++ lib.optional ((c.replicaTokenFile or null) != null) "strata_replica-token:${c.replicaTokenFile}";

  # The server's store layout (what the Ansible role's 50-layout.conf
  # drop-in says): mounts before start, the btrfs snapshot dir writable.
  layout = c:
    let
      backend = if c.settings.snapshot.backend == null then "btrfs" else c.settings.snapshot.backend;
      root = if c.settings.store.root == null then "/nix" else c.settings.store.root;
      snaps = c.settings.snapshot.snapshot_dir;
    in
    {
      unitConfig.RequiresMountsFor = (unitFor "strata-server" c.package).unitConfig.RequiresMountsFor
        ++ [ root ] ++ lib.optional (snaps != null) snaps;
      # The store root (its var/nix/strata-store-id; a bind mount of a
      # directory below it would be refused as a store-layout mount point).
      serviceConfig.ReadWritePaths = [ root ] ++ lib.optional (backend == "btrfs" && snaps != null) snaps;
    };

  serviceFor = role: c:
    lib.recursiveUpdate (unitFor "strata-${role}" c.package) {
      # Secrets from their own paths instead of /etc/strata/credentials;
      # the names inside $CREDENTIALS_DIRECTORY stay the shipped unit's.
      serviceConfig.LoadCredential = credentials c;
      restartTriggers = [ config.environment.etc."strata/${role}.yaml".text ];
    };

  gossipPort = c: if (c.settings.cluster.bind or null) == null then [ ] else [ (port c.settings.cluster.bind 7946) ];

  srv = config.services.strata.server;
  bld = config.services.strata.builder;
in
{
  options.services.strata = {
    server = common "server" // {
      replicaTokenFile = mkOption {
        type = types.nullOr (types.strMatching "/.+");
        default = null;
        example = "/run/secrets/strata-replica-token";
        description = ''
          A replica's copy of the primary's API token (replica.token_file), as an
          absolute path string, never copied into the store. Passed with
          LoadCredential=; a replica does not start without it.
        '';
      };
    };
    builder = common "builder";
  };

  config = mkMerge [
    (mkIf srv.enable {
      environment.etc."strata/server.yaml".text = builtins.toJSON (clean srv.settings);
      environment.systemPackages = [ srv.package ];
      systemd.services.strata-server = lib.recursiveUpdate (serviceFor "server" srv) (layout srv);
      networking.firewall = mkIf srv.openFirewall {
        allowedTCPPorts = [ (port srv.settings.nfs.listen 2049) ]
          ++ lib.optional (srv.settings.api.listen != null && srv.settings.api.listen != "") (port srv.settings.api.listen 7480)
          ++ gossipPort srv;
        allowedUDPPorts = gossipPort srv;
      };
    })
    (mkIf bld.enable {
      environment.etc."strata/builder.yaml".text = builtins.toJSON (clean bld.settings);
      environment.systemPackages = [ bld.package ];
      systemd.services.strata-builder = serviceFor "builder" bld;
      boot.kernelModules = [ "nfs" "overlay" ];
      networking.firewall = mkIf bld.openFirewall {
        allowedTCPPorts = lib.optional (bld.settings.api.listen != null && bld.settings.api.listen != "") (port bld.settings.api.listen 7480)
          ++ gossipPort bld;
        allowedUDPPorts = gossipPort bld;
      };
    })
  ];
}
