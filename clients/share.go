package clients

import (
	"context"
	"time"

	"github.com/tp-proxy/tp/acme/login"
)

// Share shares the reverse name with a guest (an email address, or @domain
// for anyone there) until the given time, from this device
// (docs/LOGIN.md, "Guest shares").
func (c *Client) Share(ctx context.Context, name, guest string, until time.Time) (login.ShareInfo, error) {
	key, err := c.Home.DeviceKey()
	if err != nil {
		return login.ShareInfo{}, err
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	return login.Share(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key, name, guest, until)
}

// ListShares lists this device's user's shares, oldest first.
func (c *Client) ListShares(ctx context.Context) ([]login.ShareInfo, error) {
	key, err := c.Home.DeviceKey()
	if err != nil {
		return nil, err
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	return login.ListShares(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key)
}

// RevokeShare ends one of this device's user's shares for good.
func (c *Client) RevokeShare(ctx context.Context, id string) (login.ShareInfo, error) {
	key, err := c.Home.DeviceKey()
	if err != nil {
		return login.ShareInfo{}, err
	}
	hc := login.HTTPClient(c.Root)
	defer hc.CloseIdleConnections()
	return login.RevokeShare(ctx, hc, c.Profile.Server, c.Profile.DeviceID, key, id)
}
