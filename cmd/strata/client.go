package main

import (
	"cmp"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/strata-nix/strata/api"
)

// clientFlags are shared by the commands that call a local daemon.
type clientFlags struct {
	api       string
	tokenFile string
	jsonOut   bool
}

// defaultSockets are the daemons' default API sockets, tried in order.
var defaultSockets = []string{"/var/lib/strata/server/api.sock", "/var/lib/strata/builder/api.sock"}

func (f *clientFlags) add(cmd *cobra.Command, withJSON bool) {
	cmd.Flags().StringVar(&f.api, "api", "", `daemon API: host:port, http://host:port[/prefix] (without the API's own /v1) or unix:/path (default: the server's socket `+defaultSockets[0]+` or the builder's `+defaultSockets[1]+`, whichever exists, else 127.0.0.1:7480; env STRATA_API)`)
	cmd.Flags().StringVar(&f.tokenFile, "token-file", "", "bearer token file for mutating TCP calls (env STRATA_API_TOKEN_FILE; a file named here or there must be readable; default /etc/strata/api-token if readable)")
	if withJSON {
		cmd.Flags().BoolVar(&f.jsonOut, "json", false, "print JSON")
	}
}

// client returns a client for the daemon's API. A token file given
// (--token-file, STRATA_API_TOKEN_FILE) that cannot be read is an error
// naming it; the default /etc/strata/api-token is read only if it can be.
func (f *clientFlags) client() (*api.Client, error) {
	// A mistyped STRATA_API or STRATA_API_TOKEN_FILE would be ignored
	// without a word (the command then calls another daemon, or none, or
	// sends no token): say so, as the daemons refuse it, but go on (a
	// client's shell environment is not a daemon's configuration).
	if err := checkEnv(); err != nil {
		fmt.Fprintf(os.Stderr, "strata: warning: %s\n", strings.TrimPrefix(err.Error(), "config: "))
	}
	addr, from := f.api, "--api"
	if addr == "" {
		addr, from = os.Getenv("STRATA_API"), "STRATA_API"
	}
	// An URL with the API's own /v1 would call /v1/v1/... (as server.api).
	if strings.Contains(addr, "://") {
		if err := api.CheckBaseURL(addr, "http://127.0.0.1:7480"); err != nil {
			return nil, usageError{fmt.Errorf("%s %q: %w", from, addr, err)}
		}
	}
	for _, sock := range defaultSockets {
		if addr != "" {
			break
		}
		if _, err := os.Stat(sock); err == nil {
			addr = "unix:" + sock
		}
	}
	defaulted := addr == ""
	if defaulted {
		addr = "127.0.0.1:7480"
	}
	tf, from := f.tokenFile, "--token-file"
	if tf == "" {
		tf, from = os.Getenv("STRATA_API_TOKEN_FILE"), "STRATA_API_TOKEN_FILE"
	}
	var token string
	if tf == "" {
		if b, err := os.ReadFile("/etc/strata/api-token"); err == nil {
			token = strings.TrimSpace(string(b))
		}
	} else {
		b, err := os.ReadFile(tf)
		if err != nil {
			return nil, fmt.Errorf("read token file %s (%s): %w", tf, from, err)
		}
		token = strings.TrimSpace(string(b))
	}
	used = &clientUse{addr: addr, defaulted: defaulted, token: token != ""}
	if tf != "" {
		used.tokenFile = tf + " (" + from + ")"
	}
	return api.NewClient(addr, token), nil
}

// clientUse is what the command's client() chose, for hint.
type clientUse struct {
	addr      string
	defaulted bool   // no --api, no STRATA_API, no default socket
	token     bool   // a token was sent
	tokenFile string // the token file named, and by what; "" for none
}

var used *clientUse

// hint returns a line that says what to do about err, an error of a
// command that called the daemon as used says, or "" when there is nothing
// to add: a 401 when no token was sent (which flag or file gives one), and
// nothing answering at the fallback address (no daemon socket was found).
func hint(err error, used clientUse) string {
	var se *api.StatusError
	if errors.As(err, &se) && se.Code == http.StatusUnauthorized && !used.token {
		if used.tokenFile != "" {
			return "this command sent no token: the token file " + used.tokenFile + " is empty"
		}
		return "this command sent no token: give --token-file FILE (or STRATA_API_TOKEN_FILE; /etc/strata/api-token is read when it is readable), or call the daemon's unix socket, which needs none: --api unix:<state_dir>/api.sock"
	}
	var oe *net.OpError
	if used.defaulted && errors.As(err, &oe) && oe.Op == "dial" {
		return fmt.Sprintf("no daemon found: neither %s exists and nothing answers on %s; name the daemon with --api host:port or --api unix:<state_dir>/api.sock (env STRATA_API)",
			strings.Join(defaultSockets, " nor "), used.addr)
	}
	return ""
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func parseGen(s string) (uint64, error) {
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil || id == 0 {
		return 0, usageError{fmt.Errorf("generation %q: want a positive integer", s)}
	}
	return id, nil
}

func clientCommands() []*cobra.Command {
	var pf, gf, pinf, unpf, sf, df, rf, pathsf clientFlags

	publish := &cobra.Command{
		Use:   "publish",
		Short: "Publish a generation now if the central store changed",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := pf.client()
			if err != nil {
				return err
			}
			res, err := cl.Publish(cmd.Context())
			if err != nil {
				return err
			}
			if pf.jsonOut {
				return printJSON(cmd.OutOrStdout(), res)
			}
			if res.Published {
				g := res.Generation
				fmt.Fprintf(cmd.OutOrStdout(), "published generation %d: %d paths, %d NAR bytes (parent %d)\n", g.ID, g.Paths, g.NarBytes, g.Parent)
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "nothing published: %s\n", res.Reason)
			}
			return nil
		},
	}
	pf.add(publish, true)

	gens := &cobra.Command{
		Use:   "generations",
		Short: "List the live generations",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := gf.client()
			if err != nil {
				return err
			}
			l, err := cl.Generations(cmd.Context())
			if err != nil {
				return err
			}
			if gf.jsonOut {
				return printJSON(cmd.OutOrStdout(), l)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			// On a replica: where the generations came from, and when (a
			// generation rebuilt from its snapshot after the state_dir
			// was lost has no arrival time; a new replica none yet).
			replicated := l.Role == "replica" || slices.ContainsFunc(l.Generations, func(g api.Generation) bool { return g.Arrived != nil })
			if replicated {
				of := l.ReplicaOf
				if of == "" && len(l.Generations) > 0 { // an older server
					of = l.Generations[len(l.Generations)-1].Origin
				}
				fmt.Fprintf(cmd.OutOrStdout(), "replica of %s\n", of)
				fmt.Fprintln(tw, "ID\tCREATED\tPARENT\tPATHS\tNAR BYTES\tPIN\tMOUNT\tHOLDERS\tARRIVED")
			} else {
				fmt.Fprintln(tw, "ID\tCREATED\tPARENT\tPATHS\tNAR BYTES\tPIN\tMOUNT\tHOLDERS")
			}
			for _, g := range l.Missing {
				g.MountPath = "MISSING SNAPSHOT"
				l.Generations = append(l.Generations, g)
			}
			slices.SortFunc(l.Generations, func(a, b api.Generation) int { return cmp.Compare(a.ID, b.ID) })
			for _, g := range l.Generations {
				pin := "-"
				if g.Pinned {
					pin = "pinned"
					if g.PinFrom != "" { // a replica keeps its primary's pins
						pin += "(" + g.PinFrom + ")"
					}
					if g.PinName != "" {
						pin += ":" + g.PinName
					}
				}
				holders := "-"
				if h := l.Holders[g.ID]; len(h) > 0 {
					holders = strings.Join(h, ",")
				}
				fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\t%s\t%s\t%s", g.ID, g.Created.Format("2006-01-02 15:04:05Z"), g.Parent, g.Paths, g.NarBytes, pin, g.MountPath, holders)
				if replicated {
					arrived := "-"
					if g.Arrived != nil {
						arrived = g.Arrived.Format("2006-01-02 15:04:05Z")
					}
					fmt.Fprintf(tw, "\t%s", arrived)
				}
				fmt.Fprintln(tw)
			}
			return tw.Flush()
		},
	}
	gf.add(gens, true)

	var pinName string
	pin := &cobra.Command{
		Use:   "pin N",
		Short: "Protect generation N from retention",
		Long: `Protect generation N from retention. --name gives the pin a name (it
replaces the name it has); without --name a pinned generation keeps its name
(unpin it to drop the name).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseGen(args[0])
			if err != nil {
				return err
			}
			cl, err := pinf.client()
			if err != nil {
				return err
			}
			g, err := cl.Pin(cmd.Context(), id, pinName)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pinned generation %d\n", g.ID)
			return nil
		},
	}
	pin.Flags().StringVar(&pinName, "name", "", "a name for the pin (replaces the name it has; without it, the name is kept)")
	pinf.add(pin, false)

	unpin := &cobra.Command{
		Use:   "unpin N",
		Short: "Let retention destroy generation N again",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseGen(args[0])
			if err != nil {
				return err
			}
			cl, err := unpf.client()
			if err != nil {
				return err
			}
			g, err := cl.Unpin(cmd.Context(), id)
			if err != nil {
				return err
			}
			if g.Pinned && g.PinFrom == "primary" {
				// A replica: its own pin (if any) is gone, the primary's
				// stays and retention here keeps the generation for it.
				fmt.Fprintf(cmd.OutOrStdout(), "generation %d is not pinned here, but its primary %s pins it, so retention here still keeps it: unpin it on the primary\n", g.ID, g.Origin)
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "unpinned generation %d\n", g.ID)
			return nil
		},
	}
	unpf.add(unpin, false)

	status := &cobra.Command{
		Use:   "status",
		Short: "Show the local daemon's status",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cl, err := sf.client()
			if err != nil {
				return err
			}
			st, err := cl.Status(cmd.Context())
			if err != nil {
				return err
			}
			if sf.jsonOut {
				return printJSON(cmd.OutOrStdout(), st)
			}
			return printStatus(cmd.OutOrStdout(), st)
		},
	}
	sf.add(status, true)

	var from uint64
	delta := &cobra.Command{
		Use:   "delta N --from M",
		Short: "Show the paths added and removed from generation M to N",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseGen(args[0])
			if err != nil {
				return err
			}
			cl, err := df.client()
			if err != nil {
				return err
			}
			d, err := cl.Delta(cmd.Context(), from, id)
			if err != nil {
				return err
			}
			if df.jsonOut {
				return printJSON(cmd.OutOrStdout(), d)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "delta %d -> %d\n", d.From, d.To)
			for _, line := range addedPaths(d.Added) {
				fmt.Fprintf(w, "+ %s\n", line)
			}
			for _, p := range d.Removed {
				fmt.Fprintf(w, "- %s\n", p)
			}
			return nil
		},
	}
	delta.Flags().Uint64Var(&from, "from", 0, "the older generation")
	delta.MarkFlagRequired("from")
	df.add(delta, true)

	registration := &cobra.Command{
		Use:   "registration N",
		Short: "Print generation N's registration (nix-store --dump-db format, for nix-store --load-db)",
		Long: `Print generation N's registration: the text nix-store --dump-db prints for its
valid paths (path, NAR hash, NAR size, deriver, references). It carries no
signatures or content addresses; "strata paths N" has those.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseGen(args[0])
			if err != nil {
				return err
			}
			cl, err := rf.client()
			if err != nil {
				return err
			}
			b, err := cl.Registration(cmd.Context(), id)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	}
	rf.add(registration, false)

	var pathsFrom uint64
	paths := &cobra.Command{
		Use:   "paths N [--from M]",
		Short: "Print generation N's path rows as JSON lines (what its Nix DB holds per path)",
		Long: `Print generation N's path rows, uncompressed: a header line, then one JSON
object per path (nar_hash, nar_size, deriver, refs, time, ultimate, sigs, ca,
outputs), then one per realisation. With --from M only the rows added or
changed since generation M.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseGen(args[0])
			if err != nil {
				return err
			}
			cl, err := pathsf.client()
			if err != nil {
				return err
			}
			body, err := cl.Paths(cmd.Context(), id, pathsFrom)
			if err != nil {
				return err
			}
			defer body.Close()
			zr, err := gzip.NewReader(body)
			if err != nil {
				return fmt.Errorf("paths of generation %d: %w", id, err)
			}
			if _, err := io.Copy(cmd.OutOrStdout(), zr); err != nil {
				return fmt.Errorf("paths of generation %d: %w", id, err)
			}
			return nil
		},
	}
	paths.Flags().Uint64Var(&pathsFrom, "from", 0, "only rows added or changed since this generation")
	pathsf.add(paths, false)

	var ff clientFlags
	var confirm uint64
	forget := &cobra.Command{
		Use:   "forget N --yes-forget N",
		Short: "Drop the manifest of generation N, whose snapshot is missing",
		Long: `Drop the manifest, registration and pin of generation N, whose snapshot is
missing (strata status lists such generations; the server never drops them by
itself), and on btrfs its strata-N.labels beside the snapshots. A generation whose snapshot exists is refused: unpin it and let
retention destroy it. Repeat the id with --yes-forget to confirm.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := parseGen(args[0])
			if err != nil {
				return err
			}
			if confirm != id {
				return usageError{fmt.Errorf("forgetting generation %d cannot be undone: confirm with --yes-forget %d", id, id)}
			}
			cl, err := ff.client()
			if err != nil {
				return err
			}
			if err := cl.Forget(cmd.Context(), id, confirm); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "forgot generation %d\n", id)
			return nil
		},
	}
	forget.Flags().Uint64Var(&confirm, "yes-forget", 0, "the generation id again, to confirm")
	ff.add(forget, false)
	gens.AddCommand(forget)

	return []*cobra.Command{publish, gens, pin, unpin, status, delta, registration, paths}
}

func addedPaths(reg string) []string {
	paths, err := parseRegistrationText(reg)
	if err != nil {
		return []string{"(unreadable registration: " + err.Error() + ")"}
	}
	return paths
}

func printStatus(w io.Writer, st map[string]any) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, k := range []string{"role", "replica_of", "latest", "generation", "server", "server_name", "state", "nfs", "backend", "last_rotation", "last_error", "last_error_at", "missing"} {
		if v, ok := st[k]; ok && v != nil && v != "" {
			fmt.Fprintf(tw, "%s:\t%v\n", k, v)
		}
	}
	// One line each: a problem is a sentence or two, and a list of them
	// printed as one value ran together.
	if ps, ok := st["problems"].([]any); ok {
		for _, p := range ps {
			fmt.Fprintf(tw, "problem:\t%v\n", p)
		}
	}
	if c, ok := st["cluster"].(map[string]any); ok {
		line := fmt.Sprintf("%v as %v at %v, %v members known", c["name"], c["member"], c["address"], c["members"])
		if s, ok := c["settling_for"].(string); ok && s != "" && s != "0s" {
			// Retention destroys nothing until the holds are known.
			line += fmt.Sprintf("; builders' holds known in %s at most", s)
		}
		fmt.Fprintf(tw, "cluster:\t%s\n", line)
	}
	if waits, ok := st["retention_waits"].([]any); ok {
		if len(waits) == 0 {
			fmt.Fprintf(tw, "retention:\tkeeps the newest %v, waits for nothing\n", st["retention_keep"])
		}
		for _, w := range waits {
			if m, ok := w.(map[string]any); ok {
				line := fmt.Sprintf("generation %v: %v", m["generation"], m["reason"])
				if h, ok := m["holders"].([]any); ok && len(h) > 0 {
					line += fmt.Sprintf(" %v", h)
				}
				fmt.Fprintf(tw, "retention waits:\t%s\n", line)
			}
		}
	}
	// A builder's failovers: the monitor's view and the last server change.
	if f, ok := st["failover"].(map[string]any); ok {
		n, _ := f["count"].(float64)
		line := fmt.Sprintf("after %v; %d automatic so far", f["after"], int(n))
		if since, ok := f["unanswered_since"].(string); ok {
			line += fmt.Sprintf("; the server in use has not answered since %s (%v)", since, f["reason"])
			if n, _ := f["attempts"].(float64); n > 0 {
				line += fmt.Sprintf("; %d failovers tried, failed: %v", int(n), f["attempt_error"])
			}
		}
		fmt.Fprintf(tw, "failover:\t%s\n", line)
		if l, ok := f["last"].(map[string]any); ok {
			how := "same generation"
			if r, _ := l["rotated"].(bool); r {
				how = "rotated"
			}
			fmt.Fprintf(tw, "last server change:\t%v: %v -> %v, generation %v (%s), took %v: %v\n",
				l["at"], l["from"], l["to"], l["generation"], how, l["took"], l["reason"])
		}
		if c, ok := f["candidates"].([]any); ok && len(c) > 0 {
			fmt.Fprintf(tw, "servers (best first):\t%v\n", c)
		}
	}
	// A builder's upper: its size and what it holds from the lowers.
	if u, ok := st["upper"].(map[string]any); ok {
		num := func(k string) int64 { f, _ := u[k].(float64); return int64(f) }
		fmt.Fprintf(tw, "upper:\t%d bytes in %d files; copied up from generations: %d files, %d bytes; metadata-only copies: %d; whiteouts: %d\n",
			num("bytes"), num("files"), num("from_lowers_files"), num("from_lowers_bytes"), num("metacopy_files"), num("whiteouts"))
	}
	return tw.Flush()
}
