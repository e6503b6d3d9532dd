package nfs

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	gonfs "github.com/willscott/go-nfs"
)

// goNFSLogger carries go-nfs's own log lines (it has one process-wide
// logger) to slog, tagged component=go-nfs, at most logBurst lines per
// second; lines over that are counted and reported with the next line let
// through. go-nfs's errors are about single requests of one client, so they
// go out as warnings.
type goNFSLogger struct {
	log *slog.Logger

	mu         sync.Mutex
	level      gonfs.LogLevel
	second     time.Time
	lines      int
	suppressed int
}

const logBurst = 10

var goNFSLogOnce sync.Mutex

// SetGoNFSLogger sends go-nfs's logs to log (nil: discard), rate-limited.
// go-nfs has one logger for the process: the last call wins.
func SetGoNFSLogger(log *slog.Logger) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	goNFSLogOnce.Lock()
	defer goNFSLogOnce.Unlock()
	l := &goNFSLogger{log: log.With("component", "go-nfs")}
	gonfs.SetLogger(l)
	// go-nfs checks its own level before formatting: open it as far as
	// slog's handler would let lines through.
	ctx := context.Background()
	switch {
	case log.Enabled(ctx, slog.LevelDebug):
		l.SetLevel(gonfs.DebugLevel)
	case log.Enabled(ctx, slog.LevelInfo):
		l.SetLevel(gonfs.InfoLevel)
	default:
		l.SetLevel(gonfs.WarnLevel)
	}
}

// emit logs text(); nothing is formatted for a level that is off.
func (l *goNFSLogger) emit(level slog.Level, text func() string) {
	if !l.log.Enabled(context.Background(), level) {
		return
	}
	now := time.Now().Truncate(time.Second)
	l.mu.Lock()
	if !now.Equal(l.second) {
		l.second, l.lines = now, 0
	}
	l.lines++
	if l.lines > logBurst {
		l.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := l.suppressed
	l.suppressed = 0
	l.mu.Unlock()
	msg := text()
	if suppressed > 0 {
		l.log.Log(context.Background(), level, msg, "suppressed", suppressed)
		return
	}
	l.log.Log(context.Background(), level, msg)
}

func (l *goNFSLogger) SetLevel(level gonfs.LogLevel) { l.mu.Lock(); l.level = level; l.mu.Unlock() }
func (l *goNFSLogger) GetLevel() gonfs.LogLevel {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.level
}
func (l *goNFSLogger) ParseLevel(level string) (gonfs.LogLevel, error) {
	return (&gonfs.DefaultLogger{}).ParseLevel(level)
}

func (l *goNFSLogger) Panic(args ...any) {
	l.emit(slog.LevelError, func() string { return fmt.Sprint(args...) })
}
func (l *goNFSLogger) Fatal(args ...any) {
	l.emit(slog.LevelError, func() string { return fmt.Sprint(args...) })
}
func (l *goNFSLogger) Error(args ...any) {
	l.emit(slog.LevelWarn, func() string { return fmt.Sprint(args...) })
}
func (l *goNFSLogger) Warn(args ...any) {
	l.emit(slog.LevelWarn, func() string { return fmt.Sprint(args...) })
}
func (l *goNFSLogger) Info(args ...any) {
	l.emit(slog.LevelInfo, func() string { return fmt.Sprint(args...) })
}
func (l *goNFSLogger) Debug(args ...any) {
	l.emit(slog.LevelDebug, func() string { return fmt.Sprint(args...) })
}
func (l *goNFSLogger) Trace(args ...any) {
	l.emit(slog.LevelDebug-4, func() string { return fmt.Sprint(args...) })
}
func (l *goNFSLogger) Print(args ...any) {
	l.emit(slog.LevelInfo, func() string { return fmt.Sprint(args...) })
}

func (l *goNFSLogger) Panicf(f string, args ...any) {
	l.emit(slog.LevelError, func() string { return fmt.Sprintf(f, args...) })
}
func (l *goNFSLogger) Fatalf(f string, args ...any) {
	l.emit(slog.LevelError, func() string { return fmt.Sprintf(f, args...) })
}
func (l *goNFSLogger) Errorf(f string, args ...any) {
	l.emit(slog.LevelWarn, func() string { return fmt.Sprintf(f, args...) })
}
func (l *goNFSLogger) Warnf(f string, args ...any) {
	l.emit(slog.LevelWarn, func() string { return fmt.Sprintf(f, args...) })
}
func (l *goNFSLogger) Infof(f string, args ...any) {
	l.emit(slog.LevelInfo, func() string { return fmt.Sprintf(f, args...) })
}
func (l *goNFSLogger) Debugf(f string, args ...any) {
	l.emit(slog.LevelDebug, func() string { return fmt.Sprintf(f, args...) })
}
func (l *goNFSLogger) Tracef(f string, args ...any) {
	l.emit(slog.LevelDebug-4, func() string { return fmt.Sprintf(f, args...) })
}
func (l *goNFSLogger) Printf(f string, args ...any) {
	l.emit(slog.LevelInfo, func() string { return fmt.Sprintf(f, args...) })
}
