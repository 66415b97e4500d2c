package cli

import (
	"context"
	"fmt"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	adminv1 "github.com/bucketlb/bucketlb/pkg/api/bucketlb/admin/v1"
	"github.com/bucketlb/bucketlb/pkg/config"
)

// withAdmin dials the allocator and runs fn with an authenticated context.
func (g *globals) withAdmin(ctx context.Context, fn func(context.Context, adminv1.AdminServiceClient) error) error {
	creds, err := g.allocTLS.credentials()
	if err != nil {
		return err
	}
	conn, err := dial(g.allocatorAddr, creds)
	if err != nil {
		return err
	}
	defer conn.Close()
	actx, cancel, err := g.adminContext(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	return fn(actx, adminv1.NewAdminServiceClient(conn))
}

func newStatusCmd(g *globals) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Print usage, reservations and health per bucket",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.withAdmin(cmd.Context(), func(ctx context.Context, c adminv1.AdminServiceClient) error {
				st, err := c.GetStatus(ctx, &adminv1.GetStatusRequest{})
				if err != nil {
					return fmt.Errorf("get status: %w", err)
				}
				if asJSON {
					return g.printJSON(st)
				}
				printStatus(g, st)
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the raw response as JSON")
	return cmd
}

func printStatus(g *globals, st *adminv1.GetStatusResponse) {
	fmt.Fprintf(g.out, "period %s (%s – %s)\n\n", st.GetPeriod(),
		st.GetPeriodStart().AsTime().Format(time.DateOnly), st.GetPeriodEnd().AsTime().Format(time.DateOnly))
	tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BUCKET\tSTATE\tPRIO\tLIMIT\tUSED\tRESERVED\tUSE%\tHEALTH\tFAILS\tCOOLDOWN UNTIL")
	for _, b := range st.GetBuckets() {
		cool := "-"
		if b.GetCoolingDown() {
			cool = b.GetCooldownUntil().AsTime().Local().Format(time.TimeOnly)
		}
		spec := b.GetBucket()
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%.1f\t%d\t%d\t%s\n", spec.GetId(), stateName(spec.GetState()), spec.GetPriority(),
			human(b.GetLimitBytes()), human(b.GetUsedBytes()), human(b.GetReservedBytes()), b.GetUtilizationPercent(),
			b.GetHealthScore(), b.GetConsecutiveFailures(), cool)
	}
	fmt.Fprintf(tw, "TOTAL\t\t\t%s\t%s\t%s\t%.1f\t\t\t\n", human(st.GetTotalLimitBytes()), human(st.GetTotalUsedBytes()),
		human(st.GetTotalReservedBytes()), st.GetTotalUtilizationPercent())
	tw.Flush()
}

func stateName(s adminv1.BucketState) string {
	switch s {
	case adminv1.BucketState_BUCKET_STATE_ACTIVE:
		return "active"
	case adminv1.BucketState_BUCKET_STATE_DRAINING:
		return "draining"
	case adminv1.BucketState_BUCKET_STATE_DISABLED:
		return "disabled"
	}
	return "?"
}

func human(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func (g *globals) printJSON(m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(g.out, string(b))
	return err
}

// changes is the bucket b describes with the update mask of the fields
// whose flags were given (set reports which). An empty --state keeps the
// bucket's. An endpoint derived from the old account id follows a new one
// (the allocator sees to it).
func changes(b *config.Bucket, set func(flag string) bool) (*adminv1.BucketSpec, *fieldmaskpb.FieldMask, error) {
	spec := &adminv1.BucketSpec{
		Id: b.ID, Name: b.Name, Endpoint: b.Endpoint, AccountId: b.AccountID, Region: b.Region,
		CredentialsRef: b.CredentialsRef, PublicUrl: b.PublicURL, MonthlyLimitBytes: int64(b.MonthlyLimit),
		Priority: b.Priority, Weight: b.Weight, PathStyle: b.PathStyle,
	}
	mask := &fieldmaskpb.FieldMask{}
	for _, f := range []struct{ flag, field string }{
		{"name", "name"}, {"endpoint", "endpoint"}, {"account-id", "account_id"}, {"region", "region"},
		{"credentials-ref", "credentials_ref"}, {"public-url", "public_url"}, {"monthly-limit", "monthly_limit_bytes"},
		{"priority", "priority"}, {"weight", "weight"}, {"path-style", "path_style"},
	} {
		if set(f.flag) {
			mask.Paths = append(mask.Paths, f.field)
		}
	}
	if set("state") && b.State != "" {
		s, err := config.ParseState(b.State)
		if err != nil {
			return nil, nil, fmt.Errorf("--state: %w", err)
		}
		spec.State = s
		mask.Paths = append(mask.Paths, "state")
	}
	return spec, mask, nil
}

func newBucketsCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "buckets", Short: "Administer buckets (needs the admin token)"}
	admin := func(use, short string, nargs int, fn func(context.Context, adminv1.AdminServiceClient, []string) (proto.Message, error)) *cobra.Command {
		return &cobra.Command{
			Use: use, Short: short, Args: cobra.ExactArgs(nargs),
			RunE: func(cmd *cobra.Command, args []string) error {
				return g.withAdmin(cmd.Context(), func(ctx context.Context, c adminv1.AdminServiceClient) error {
					m, err := fn(ctx, c, args)
					if err != nil {
						return err
					}
					return g.printJSON(m)
				})
			},
		}
	}
	var b config.Bucket
	var limit string
	var put *cobra.Command
	put = admin("put", "Create a bucket, or change the given fields of one", 0, func(ctx context.Context, c adminv1.AdminServiceClient, _ []string) (proto.Message, error) {
		n, err := config.ParseByteSize(limit)
		if err != nil {
			return nil, fmt.Errorf("--monthly-limit: %w", err)
		}
		b.MonthlyLimit = config.ByteSize(n)
		// A bucket that exists changes only in the fields whose flags are
		// given (a limit raised must not reset its priority or endpoint),
		// applied by the allocator to the bucket as it is then.
		spec, mask, err := changes(&b, put.Flags().Changed)
		if err != nil {
			return nil, err
		}
		var resp proto.Message
		if len(mask.GetPaths()) > 0 {
			resp, err = c.PutBucket(ctx, &adminv1.PutBucketRequest{Bucket: spec, UpdateMask: mask})
		} else {
			resp, err = c.GetBucket(ctx, &adminv1.GetBucketRequest{Id: b.ID}) // nothing to change
		}
		if status.Code(err) != codes.NotFound {
			return resp, err
		}
		spec, err = b.Spec()
		if err != nil {
			return nil, err
		}
		if b.State == "" {
			spec.State = adminv1.BucketState_BUCKET_STATE_UNSPECIFIED // keep the bucket's
		}
		return c.PutBucket(ctx, &adminv1.PutBucketRequest{Bucket: spec})
	})
	pf := put.Flags()
	pf.StringVar(&b.ID, "id", "", "bucket id ([a-z0-9-])")
	pf.StringVar(&b.Name, "name", "", "S3 bucket name")
	pf.StringVar(&b.Endpoint, "endpoint", "", "S3 endpoint URL (default from --account-id for R2)")
	pf.StringVar(&b.AccountID, "account-id", "", "Cloudflare account id")
	pf.StringVar(&b.Region, "region", "", "signing region (default auto)")
	pf.StringVar(&b.CredentialsRef, "credentials-ref", "", "credentials name, e.g. R2_BUCKET1")
	pf.StringVar(&b.PublicURL, "public-url", "", "public base URL")
	pf.StringVar(&limit, "monthly-limit", "10GB", "monthly budget, e.g. 10GB")
	pf.Int32Var(&b.Priority, "priority", 0, "priority (lower wins)")
	pf.Int32Var(&b.Weight, "weight", 1, "weight for weighted round robin")
	pf.StringVar(&b.State, "state", "", "active, draining or disabled (default: keep the bucket's, active for a new one)")
	pf.BoolVar(&b.PathStyle, "path-style", false, "path-style addressing")
	put.Long = "Create a bucket from the flags (unset ones take their defaults), or, for a bucket that exists, change only the fields whose flags are given."

	cmd.AddCommand(
		admin("list", "List buckets", 0, func(ctx context.Context, c adminv1.AdminServiceClient, _ []string) (proto.Message, error) {
			return c.ListBuckets(ctx, &adminv1.ListBucketsRequest{})
		}),
		admin("get ID", "Show a bucket", 1, func(ctx context.Context, c adminv1.AdminServiceClient, a []string) (proto.Message, error) {
			return c.GetBucket(ctx, &adminv1.GetBucketRequest{Id: a[0]})
		}),
		put,
		admin("delete ID", "Delete a bucket spec (objects stay)", 1, func(ctx context.Context, c adminv1.AdminServiceClient, a []string) (proto.Message, error) {
			return c.DeleteBucket(ctx, &adminv1.DeleteBucketRequest{Id: a[0]})
		}),
		admin("state ID active|draining|disabled", "Set a bucket's state", 2, func(ctx context.Context, c adminv1.AdminServiceClient, a []string) (proto.Message, error) {
			s, err := config.ParseState(a[1])
			if err != nil {
				return nil, fmt.Errorf("state: %w", err)
			}
			return c.SetBucketState(ctx, &adminv1.SetBucketStateRequest{Id: a[0], State: s})
		}),
		admin("reset-health ID", "Clear failures and cooldown", 1, func(ctx context.Context, c adminv1.AdminServiceClient, a []string) (proto.Message, error) {
			return c.ResetHealth(ctx, &adminv1.ResetHealthRequest{Id: a[0]})
		}),
		admin("reset-usage ID", "Set this period's usage to 0", 1, func(ctx context.Context, c adminv1.AdminServiceClient, a []string) (proto.Message, error) {
			return c.ResetUsage(ctx, &adminv1.ResetUsageRequest{Id: a[0]})
		}),
		admin("correct-usage ID SIZE", "Set this period's usage to SIZE (e.g. 3GB)", 2, func(ctx context.Context, c adminv1.AdminServiceClient, a []string) (proto.Message, error) {
			n, err := config.ParseByteSize(a[1])
			if err != nil {
				return nil, err
			}
			return c.CorrectUsage(ctx, &adminv1.CorrectUsageRequest{Id: a[0], UsedBytes: n})
		}),
	)
	return cmd
}
