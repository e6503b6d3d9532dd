package main

import (
	"fmt"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/strata-nix/strata/cluster"
)

// clusterCommands are `strata members` and `strata cluster keys ...`.
func clusterCommands() []*cobra.Command {
	var mf, kf clientFlags
	members := &cobra.Command{
		Use:   "members",
		Short: "List the cluster members the local daemon knows (gossip)",
		Long: `List the cluster members the local daemon (server or builder) knows: name,
role, gossip address, state (alive, suspect, dead, left), the generations a
server serves or a builder holds, and when it was last seen alive. A dead
builder still holds its generations for cluster.dead_grace; one that left
holds nothing.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var ms []cluster.Member
			cl, err := mf.client()
			if err != nil {
				return err
			}
			if err := cl.Do(cmd.Context(), http.MethodGet, "/v1/members", &ms); err != nil {
				return err
			}
			if mf.jsonOut {
				return printJSON(cmd.OutOrStdout(), ms)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tROLE\tADDRESS\tSTATE\tGENERATIONS\tHOLDS\tLAST SEEN")
			for _, m := range ms {
				gens := make([]string, len(m.Generations))
				for i, g := range m.Generations {
					gens[i] = fmt.Sprint(g)
				}
				g := strings.Join(gens, ",")
				if g == "" {
					g = "-"
				}
				if m.Partial {
					g += " (newest)"
				}
				holds := "-"
				if m.Role == cluster.RoleBuilder {
					holds = map[bool]string{true: "yes", false: "no"}[m.Holds]
				}
				seen := "never"
				if m.LastSeen != nil {
					seen = time.Since(*m.LastSeen).Round(time.Second).String() + " ago"
				}
				name := m.Name
				if m.Self {
					name += " (self)"
				}
				role := m.Role.String()
				if m.Replica {
					role = "replica"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, role, m.Address, m.State, g, holds, seen)
			}
			return tw.Flush()
		},
	}
	mf.add(members, true)

	keys := &cobra.Command{
		Use:   "keys [list | install KEY | use KEY | remove KEY]",
		Short: "Show or change the local daemon's gossip keyring",
		Long: `Show or change the local daemon's gossip encryption keyring without a restart.
KEY is a base64 32-byte AES key ("-" reads it from standard input). The change
is written to cluster.keyring_file first and applied only when that worked; a
keyring the daemon cannot write is refused with nothing changed. Under the
shipped units the keyring is a read-only systemd credential: there, change
/etc/strata/credentials/cluster.keys (NixOS: clusterKeyringFile) on every
member and restart each, in the same three rounds.

The keyring is per member: rotate in three rounds, each on every member
(servers and builders) before the next:
  1. strata cluster keys install NEW   (every member can now decrypt NEW)
  2. strata cluster keys use NEW       (members encrypt with NEW)
  3. strata cluster keys remove OLD
A member that uses a key before every member installed it is refused by the
others and declared dead.`,
		Args: cobra.RangeArgs(0, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var out cluster.KeyList
			c, err := kf.client()
			if err != nil {
				return err
			}
			if len(args) == 0 || args[0] == "list" {
				if len(args) > 1 {
					return usageError{fmt.Errorf("list takes no key")}
				}
				if err := c.Do(cmd.Context(), http.MethodGet, "/v1/cluster/keys", &out); err != nil {
					return err
				}
			} else {
				op := args[0]
				if op != "install" && op != "use" && op != "remove" {
					return usageError{fmt.Errorf("keys %q: want list, install, use or remove", op)}
				}
				if len(args) != 2 {
					return usageError{fmt.Errorf("keys %s needs a base64 key (or - to read it from standard input)", op)}
				}
				key := args[1]
				if key == "-" {
					var b strings.Builder
					buf := make([]byte, 4096)
					n, _ := os.Stdin.Read(buf)
					b.Write(buf[:n])
					key = strings.TrimSpace(b.String())
				}
				if _, err := cluster.ParseKey(key); err != nil {
					return usageError{err}
				}
				if err := c.Send(cmd.Context(), http.MethodPost, "/v1/cluster/keys/"+op, cluster.KeyRequest{Key: key}, &out); err != nil {
					return err
				}
			}
			if kf.jsonOut {
				return printJSON(cmd.OutOrStdout(), out)
			}
			if !out.Encrypted {
				fmt.Fprintln(cmd.OutOrStdout(), "gossip is not encrypted (cluster.insecure)")
				return nil
			}
			for _, k := range out.Keys {
				p := ""
				if k.Primary {
					p = "  primary"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s%s\n", k.Fingerprint, p)
			}
			return nil
		},
	}
	kf.add(keys, true)
	clusterCmd := &cobra.Command{Use: "cluster", Short: "Cluster (gossip) administration"}
	clusterCmd.AddCommand(keys)
	return []*cobra.Command{members, clusterCmd}
}
