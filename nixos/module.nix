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

  backendOf = c: if c.settings.snapshot.backend == null then "btrfs" else c.settings.snapshot.backend;
  # A replica (replica.of or replica.from_cluster) publishes nothing and has
  # no store.root.
  isReplica = c: (c.settings.replica.of or null) != null && c.settings.replica.of != ""
    || (c.settings.replica.from_cluster or null) == true;
  gossipOn = c: (c.settings.cluster.bind or null) != null && c.settings.cluster.bind != ""
    || (c.settings.cluster.join or null) != null && c.settings.cluster.join != [ ];

  # The server's store layout (what the Ansible role's 50-layout.conf
  # drop-in says): mounts before start; writable in the read-only system:
  # a primary's store root (its var/nix/strata-store-id; a bind mount of a
  # directory below it would be refused as a store-layout mount point), the
  # btrfs snapshot dir (a replica's btrfs receive writes there), the ZFS
  # mount dir when set outside state_dir.
  layout = c:
    let
      root = if c.settings.store.root == null then "/nix" else c.settings.store.root;
      snaps = c.settings.snapshot.snapshot_dir;
      mnt = c.settings.snapshot.mount_dir;
      paths = lib.optional (!isReplica c) root
        ++ lib.optional (backendOf c == "btrfs" && snaps != null) snaps
        ++ lib.optional (backendOf c == "zfs" && mnt != null && mnt != "") mnt;
    in
    {
      unitConfig.RequiresMountsFor = (unitFor "strata-server" c.package).unitConfig.RequiresMountsFor ++ paths;
      serviceConfig.ReadWritePaths = paths;
    };

  # What evaluation refuses (a NixOS assertion each): what would stop the
  # daemon at its first start, or a setting the unit would silently override.
  assertionsFor = role: c:
    let
      opt = "services.strata.${role}";
      # The unit points these keys at its credentials (STRATA_* variables,
      # which override the file).
      secretKeys = [
        { key = "api.token_file"; s = "api"; k = "token_file"; use = "apiTokenFile"; }
        { key = "cluster.keyring_file"; s = "cluster"; k = "keyring_file"; use = "clusterKeyringFile"; }
      ] ++ lib.optional (role == "server")
        { key = "replica.token_file"; s = "replica"; k = "token_file"; use = "replicaTokenFile"; };
    in
    map (x: {
      assertion = (c.settings.${x.s}.${x.k} or null) == null;
      message = "${opt}.settings.${x.key} is set, but the unit sets ${x.key} to its credential (LoadCredential=), so the value would be ignored: set ${opt}.${x.use} instead.";
    }) secretKeys
    ++ [{
      assertion = !(gossipOn c) || c.settings.cluster.insecure == true || c.clusterKeyringFile != null;
      message = "${opt}: gossip is on (settings.cluster.bind or settings.cluster.join) and needs a keyring: set ${opt}.clusterKeyringFile (or settings.cluster.insecure = true on a trusted network).";
    }]
    ++ lib.optionals (role == "server") [
      {
        assertion = backendOf c != "btrfs" || c.settings.snapshot.snapshot_dir != null;
        message = "${opt}.settings.snapshot.snapshot_dir must be set with the btrfs backend: "
          + (if isReplica c then "any directory on a btrfs filesystem, where received snapshots go."
          else "a directory on the btrfs filesystem of the central store, outside store.root.");
      }
      {
        assertion = !(isReplica c) || c.replicaTokenFile != null;
        message = "${opt}: a replica (settings.replica.of or settings.replica.from_cluster) needs the primary's API token: set ${opt}.replicaTokenFile.";
      }
    ];

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
      assertions = assertionsFor "server" srv;
      environment.etc."strata/server.yaml".text = builtins.toJSON (clean srv.settings);
      # The btrfs snapshot dir must exist for ReadWritePaths= (the Ansible
      # role creates it too).
      systemd.tmpfiles.rules = lib.optional (backendOf srv == "btrfs" && srv.settings.snapshot.snapshot_dir != null)
        "d ${srv.settings.snapshot.snapshot_dir} 0700 root root -";
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
      assertions = assertionsFor "builder" bld;
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
