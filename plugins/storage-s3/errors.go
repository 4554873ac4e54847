package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/gpuaas/gpuaas/sdk/base"
)

// codeSentinel maps an S3 error code to an SDK sentinel, or nil. HEAD
// responses have no body, so their errors carry only the HTTP status (see
// statusSentinel).
func codeSentinel(code string) error {
	switch code {
	case "NoSuchKey", "NotFound", "NoSuchUpload":
		return base.ErrNotFound
	case "NoSuchBucket": // the configured bucket went away
		return base.ErrFailedPrecondition
	case "AccessDenied", "AllAccessDisabled", "AccountProblem":
		return base.ErrPermissionDenied
	case "InvalidObjectState":
		return base.ErrFailedPrecondition
	case "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
		"TokenRefreshRequired", "InvalidSecurity", "AuthorizationHeaderMalformed", "RequestTimeTooSkewed",
		"XAdminUserNotFound": // versitygw: no such access key id

		return base.ErrUnauthenticated
	case "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
		"ThrottlingException", "RequestLimitExceeded", "OperationAborted":
		return base.ErrUnavailable
	case "PreconditionFailed", "ConditionalRequestConflict":
		return base.ErrConflict
	case "EntityTooLarge", "QuotaExceeded": // QuotaExceeded: Ceph RGW
		return base.ErrResourceExhausted
	case "InvalidArgument", "InvalidRequest", "KeyTooLongError", "MetadataTooLarge", "EntityTooSmall",
		"InvalidPart", "InvalidPartOrder", "InvalidRange", "IncompleteBody", "InvalidDigest", "BadDigest",
		"MalformedXML", "InvalidObjectName", "UnexpectedContent", "MissingContentLength":
		return base.ErrInvalidArgument
	}
	return nil
}

// statusSentinel maps an HTTP status without a known error code.
func statusSentinel(status int) error {
	switch {
	case status == http.StatusNotFound:
		return base.ErrNotFound
	case status == http.StatusUnauthorized:
		return base.ErrUnauthenticated
	case status == http.StatusForbidden:
		return base.ErrPermissionDenied
	case status == http.StatusConflict, status == http.StatusPreconditionFailed:
		return base.ErrConflict
	case status == http.StatusRequestEntityTooLarge:
		return base.ErrResourceExhausted
	case status == http.StatusTooManyRequests, status == http.StatusRequestTimeout, status >= 500:
		return base.ErrUnavailable
	case status >= 400:
		return base.ErrInvalidArgument
	}
	return nil
}

// Classify returns the SDK sentinel an error from the S3 client stands
// for: the one place S3 error codes, HTTP statuses and transport failures
// become sentinels. Errors no rule knows are base.ErrInternal.
// Cancellation is not classified here: see wrapError.
func Classify(err error) error {
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		if s := codeSentinel(apiErr.ErrorCode()); s != nil {
			return s
		}
	}
	var withStatus interface{ HTTPStatusCode() int }
	if errors.As(err, &withStatus) {
		if s := statusSentinel(withStatus.HTTPStatusCode()); s != nil {
			return s
		}
	}
	var (
		sendErr  *smithyhttp.RequestSendError
		quotaErr *ratelimit.QuotaExceededError
		netErr   net.Error
	)
	switch {
	case errors.As(err, &netErr) && netErr.Timeout(), errors.Is(err, context.DeadlineExceeded):
		return base.ErrDeadlineExceeded
	case errors.As(err, &sendErr), errors.As(err, &quotaErr), errors.As(err, &netErr),
		errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return base.ErrUnavailable
	}
	return base.ErrInternal
}

// wrapError wraps err from an S3 call made for what under ctx: with the
// caller's context error when ctx is done (the call was cut short), else
// with the sentinel Classify finds. Errors that already carry a sentinel
// or a context error (a failing request body, say) keep it.
func wrapError(ctx context.Context, what string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("storage-s3: %s: %w (%v)", what, ctxErr, err)
	}
	if errors.Is(err, context.Canceled) || hasSentinel(err) {
		return fmt.Errorf("storage-s3: %s: %w", what, err)
	}
	return fmt.Errorf("storage-s3: %s: %w: %w", what, err, Classify(err))
}

func hasSentinel(err error) bool {
	for _, s := range base.Sentinels() {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// checkBucket makes sure the bucket exists and the credentials may use it,
// and explains what is wrong when not.
func (s *settings) checkBucket(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, configureTimeout)
	defer cancel()
	_, err := s.client.HeadBucket(cctx, &s3.HeadBucketInput{Bucket: &s.bucket})
	if err == nil {
		return nil
	}
	where := fmt.Sprintf("bucket %q at %s", s.bucket, s.endpoint)
	if ctx.Err() != nil {
		return wrapError(ctx, "configure: checking "+where, err)
	}
	var respErr *awshttp.ResponseError
	if errors.As(err, &respErr) && respErr.Response != nil {
		switch respErr.HTTPStatusCode() {
		case http.StatusMovedPermanently:
			return &base.ConfigError{Field: fieldRegion, Reason: fmt.Sprintf("%s is in region %q, not this one",
				where, respErr.Response.Header.Get("X-Amz-Bucket-Region"))}
		case http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound:
			// A HEAD response has no error code; a GET tells bad
			// credentials from missing permissions, and a missing bucket
			// from an unknown access key (versitygw answers 404 to both).
			if _, lerr := s.client.ListObjectsV2(cctx, &s3.ListObjectsV2Input{Bucket: &s.bucket, MaxKeys: aws.Int32(1)}); lerr != nil {
				err = lerr
			}
		}
	}
	switch sentinel := Classify(err); {
	case errors.Is(sentinel, base.ErrNotFound), errors.Is(sentinel, base.ErrFailedPrecondition):
		return &base.ConfigError{Field: fieldBucket, Reason: fmt.Sprintf("%s does not exist", where)}
	case errors.Is(sentinel, base.ErrUnauthenticated):
		return fmt.Errorf("storage-s3: configure: %s refused the credentials (check access_key_id, secret_access_key and region): %w", s.endpoint, wrapError(ctx, where, err))
	case errors.Is(sentinel, base.ErrPermissionDenied):
		return fmt.Errorf("storage-s3: configure: the credentials may not list %s (the driver needs s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject and s3:AbortMultipartUpload): %w", where, wrapError(ctx, where, err))
	case errors.Is(sentinel, base.ErrUnavailable), errors.Is(sentinel, base.ErrDeadlineExceeded):
		return fmt.Errorf("storage-s3: configure: cannot reach %s: %w", s.endpoint, wrapError(ctx, where, err))
	}
	return fmt.Errorf("storage-s3: configure: checking %w", wrapError(ctx, where, err))
}
