package nfs

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/strata-nix/strata/internal/xdr"
	"github.com/strata-nix/strata/server/nfs/guard"
)

// metrics are the export's Prometheus collectors. Requests and errors are
// counted from the RPC records (conn), because go-nfs has no per-call hook:
// each request's procedure is read from its call header, and each reply's
// RPC and NFS/MOUNT status from its reply header. Calls answered by the fast
// path are counted there; it only answers successes.
type metrics struct {
	requests    *prometheus.CounterVec // proc
	errors      *prometheus.CounterVec // proc, status
	readBytes   prometheus.Counter
	nfsRequests [len(nfsProcNames)]prometheus.Counter // requests' children for NFS procs, prebuilt
	conns       prometheus.Gauge
	generations prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "strata", Subsystem: "nfs", Name: "requests_total",
			Help: "NFS and MOUNT requests received, by procedure (e.g. NFS3_READ, MOUNT3_MNT).",
		}, []string{"proc"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "strata", Subsystem: "nfs", Name: "errors_total",
			Help: "Replies that were not OK, by procedure and status (NFS3ERR_*, MNT3ERR_*, or an RPC-level PROC_UNAVAIL, GARBAGE_ARGS, SYSTEM_ERR, DENIED).",
		}, []string{"proc", "status"}),
		readBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "strata", Subsystem: "nfs", Name: "read_bytes_total",
			Help: "File bytes read from generations for READ replies.",
		}),
		conns: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "strata", Subsystem: "nfs", Name: "connections",
			Help: "Open client connections.",
		}),
		generations: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "strata", Subsystem: "nfs", Name: "generations",
			Help: "Generations currently exported.",
		}),
	}
	for p := range m.nfsRequests {
		m.nfsRequests[p] = m.requests.WithLabelValues(procName(progNFS, uint32(p)))
	}
	for _, c := range []prometheus.Collector{m.requests, m.errors, m.readBytes, m.conns, m.generations} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

const (
	progNFS   = 100003
	progMount = 100005
)

var nfsProcNames = [...]string{"NULL", "GETATTR", "SETATTR", "LOOKUP", "ACCESS", "READLINK", "READ",
	"WRITE", "CREATE", "MKDIR", "SYMLINK", "MKNOD", "REMOVE", "RMDIR", "RENAME", "LINK", "READDIR",
	"READDIRPLUS", "FSSTAT", "FSINFO", "PATHCONF", "COMMIT"}

var mountProcNames = [...]string{"NULL", "MNT", "DUMP", "UMNT", "UMNTALL", "EXPORT"}

var nfsaclProcNames = [...]string{"NULL", "GETACL", "SETACL"}

// procName is a bounded label for (prog, proc).
func procName(prog, proc uint32) string {
	switch {
	case prog == progNFS && proc < uint32(len(nfsProcNames)):
		return "NFS3_" + nfsProcNames[proc]
	case prog == progMount && proc < uint32(len(mountProcNames)):
		return "MOUNT3_" + mountProcNames[proc]
	case prog == progNFSACL && proc < uint32(len(nfsaclProcNames)):
		return "NFSACL3_" + nfsaclProcNames[proc]
	}
	return "other"
}

var nfsStatNames = map[uint32]string{
	1: "NFS3ERR_PERM", 2: "NFS3ERR_NOENT", 5: "NFS3ERR_IO", 6: "NFS3ERR_NXIO", 13: "NFS3ERR_ACCES",
	17: "NFS3ERR_EXIST", 18: "NFS3ERR_XDEV", 19: "NFS3ERR_NODEV", 20: "NFS3ERR_NOTDIR",
	21: "NFS3ERR_ISDIR", 22: "NFS3ERR_INVAL", 27: "NFS3ERR_FBIG", 28: "NFS3ERR_NOSPC",
	30: "NFS3ERR_ROFS", 31: "NFS3ERR_MLINK", 63: "NFS3ERR_NAMETOOLONG", 66: "NFS3ERR_NOTEMPTY",
	69: "NFS3ERR_DQUOT", 70: "NFS3ERR_STALE", 71: "NFS3ERR_REMOTE", 10001: "NFS3ERR_BADHANDLE",
	10002: "NFS3ERR_NOT_SYNC", 10003: "NFS3ERR_BAD_COOKIE", 10004: "NFS3ERR_NOTSUPP",
	10005: "NFS3ERR_TOOSMALL", 10006: "NFS3ERR_SERVERFAULT", 10007: "NFS3ERR_BADTYPE",
	10008: "NFS3ERR_JUKEBOX",
}

var mountStatNames = map[uint32]string{
	1: "MNT3ERR_PERM", 2: "MNT3ERR_NOENT", 5: "MNT3ERR_IO", 13: "MNT3ERR_ACCES", 20: "MNT3ERR_NOTDIR",
	22: "MNT3ERR_INVAL", 63: "MNT3ERR_NAMETOOLONG", 10004: "MNT3ERR_NOTSUPP", 10006: "MNT3ERR_SERVERFAULT",
}

var acceptStatNames = [...]string{"SUCCESS", "PROG_UNAVAIL", "PROG_MISMATCH", "PROC_UNAVAIL", "GARBAGE_ARGS", "SYSTEM_ERR"}

func statName(names map[uint32]string, s uint32) string {
	if n, ok := names[s]; ok {
		return n
	}
	return "other"
}

type call struct{ prog, proc uint32 }

// maxPending bounds the xid -> call map per connection (go-nfs answers each
// connection's calls in order, one at a time, so only a few are ever pending).
const maxPending = 1024

func (s *conn) onCall(c guard.Call) {
	s.m.requests.WithLabelValues(procName(c.Prog, c.Proc)).Inc()
	s.pmu.Lock()
	if len(s.pending) >= maxPending {
		clear(s.pending)
	}
	s.pending[c.XID] = call{prog: c.Prog, proc: c.Proc}
	s.pmu.Unlock()
}

func (s *conn) onReply(p []byte) {
	// xid, msg_type=1, reply_stat, [verf flavor, verf body, accept_stat, results]
	d := xdr.NewDecoder(p)
	xid, msgType := d.U32(), d.U32()
	if d.Err != nil || msgType != 1 {
		return
	}
	s.pmu.Lock()
	c, ok := s.pending[xid]
	delete(s.pending, xid)
	s.pmu.Unlock()
	if !ok {
		return
	}
	proc := procName(c.prog, c.proc)
	if replyStat := d.U32(); d.Err != nil {
		return
	} else if replyStat != 0 {
		s.m.errors.WithLabelValues(proc, "DENIED").Inc()
		return
	}
	d.U32() // verifier flavor
	d.Opaque(400, "verifier")
	as := d.U32()
	if d.Err != nil {
		return
	}
	if as != 0 {
		name := "SYSTEM_ERR"
		if as < uint32(len(acceptStatNames)) {
			name = acceptStatNames[as]
		}
		s.m.errors.WithLabelValues(proc, name).Inc()
		return
	}
	if c.proc == 0 {
		return // NULL has no status
	}
	st := d.U32()
	if d.Err != nil || st == 0 {
		return
	}
	switch {
	case c.prog == progNFS:
		s.m.errors.WithLabelValues(proc, statName(nfsStatNames, st)).Inc()
	case c.prog == progMount && c.proc == 1:
		s.m.errors.WithLabelValues(proc, statName(mountStatNames, st)).Inc()
	}
}
