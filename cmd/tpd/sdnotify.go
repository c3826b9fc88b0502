package main

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// sdNotify tells systemd (Type=notify) what tpd is doing: "READY=1" once every
// listener is open, "RELOADING=1" while a reload runs, "STOPPING=1" when a drain
// starts. The protocol is one datagram of newline-separated assignments on the
// unix socket named by $NOTIFY_SOCKET (a leading '@' names an abstract socket,
// which Go's net package maps itself). Without $NOTIFY_SOCKET it does nothing,
// so tpd run by hand, in a container or by a test behaves as before.
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notify systemd at %s: %w", path, err)
	}
	defer conn.Close()
	if err := conn.SetWriteDeadline(time.Now().Add(time.Second)); err != nil {
		return fmt.Errorf("notify systemd at %s: %w", path, err)
	}
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("notify systemd at %s: %w", path, err)
	}
	return nil
}

// sdReloading is the message that opens a reload. MONOTONIC_USEC (CLOCK_MONOTONIC,
// microseconds) lets systemd 253+ match it to the reload it asked for
// (Type=notify-reload); older ones ignore the field.
func sdReloading() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "RELOADING=1"
	}
	return "RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(ts.Nano()/1000, 10)
}

// tellSystemd sends state and logs (without failing) when systemd cannot be told:
// systemd then times the start or reload out and says so itself.
func tellSystemd(log *slog.Logger, state string) {
	if err := sdNotify(state); err != nil {
		log.Warn("could not tell systemd the service state", "state", state, "err", err)
	}
}
