package clients

// readFD reads nothing on Windows, where a socket read through a RawConn would
// block: the first bytes then go through the bridge as usual.
func readFD(uintptr, []byte) (int, error) { return 0, nil }
