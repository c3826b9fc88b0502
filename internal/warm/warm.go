package warm

import (
	_ "github.com/mholt/acmez/v3"
	_ "github.com/open-policy-agent/opa/v1/rego"
	_ "github.com/open-policy-agent/opa/v1/tester"
	_ "github.com/quic-go/quic-go"
	_ "github.com/smallstep/certificates/acme/api"
	_ "github.com/smallstep/certificates/acme/db/nosql"
	_ "github.com/smallstep/certificates/authority"
	_ "github.com/smallstep/certificates/api"
	_ "github.com/spf13/cobra"
	_ "github.com/spf13/viper"
)
