package s3store_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
)

func apiError(code string, status int) error {
	return &smithy.OperationError{ServiceID: "S3", OperationName: "GetObject", Err: &smithyhttp.ResponseError{
		Response: &smithyhttp.Response{Response: &http.Response{StatusCode: status}},
		Err:      &smithy.GenericAPIError{Code: code, Message: "from the server"},
	}}
}

func statusError(status int) error {
	return &smithy.OperationError{ServiceID: "S3", OperationName: "HeadObject", Err: &smithyhttp.ResponseError{
		Response: &smithyhttp.Response{Response: &http.Response{StatusCode: status}},
		Err:      errors.New("no body"),
	}}
}

func TestClassify(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		err  error
		want error
	}{
		{"NoSuchKey", apiError("NoSuchKey", 404), base.ErrNotFound},
		{"typed NoSuchKey", &types.NoSuchKey{}, base.ErrNotFound},
		{"HEAD 404", statusError(404), base.ErrNotFound},
		{"AccessDenied", apiError("AccessDenied", 403), base.ErrPermissionDenied},
		{"HEAD 403", statusError(403), base.ErrPermissionDenied},
		{"InvalidAccessKeyId", apiError("InvalidAccessKeyId", 403), base.ErrUnauthenticated},
		{"SignatureDoesNotMatch", apiError("SignatureDoesNotMatch", 403), base.ErrUnauthenticated},
		{"SlowDown", apiError("SlowDown", 503), base.ErrUnavailable},
		{"InternalError", apiError("InternalError", 500), base.ErrUnavailable},
		{"unknown code, status 502", apiError("Whatever", 502), base.ErrUnavailable},
		{"HEAD 503", statusError(503), base.ErrUnavailable},
		{"PreconditionFailed", apiError("PreconditionFailed", 412), base.ErrConflict},
		{"HEAD 412", statusError(412), base.ErrConflict},
		{"EntityTooLarge", apiError("EntityTooLarge", 400), base.ErrResourceExhausted},
		{"InvalidArgument", apiError("InvalidArgument", 400), base.ErrInvalidArgument},
		{"NoSuchBucket", apiError("NoSuchBucket", 404), base.ErrFailedPrecondition},
		{"connection refused", &smithyhttp.RequestSendError{Err: &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}}, base.ErrUnavailable},
		{"connection reset", fmt.Errorf("read: %w", syscall.ECONNRESET), base.ErrUnavailable},
		{"body cut short", fmt.Errorf("reading: %w", io.ErrUnexpectedEOF), base.ErrUnavailable},
		{"timeout inside the driver", fmt.Errorf("waiting: %w", context.DeadlineExceeded), base.ErrDeadlineExceeded},
		{"anything else", errors.New("surprise"), base.ErrInternal},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := s3store.Classify(c.err)
			if got != c.want {
				t.Errorf("Classify(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}
