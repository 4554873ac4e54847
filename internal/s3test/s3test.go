// Package s3test holds helpers for tests that write to a real S3 server
// under a prefix of their own.
package s3test

import (
	"context"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// Empty aborts every unfinished multipart upload under prefix and deletes
// every object under it, so that a test leaves nothing behind on a server
// that outlives it. Failures are logged, not failed: leftovers are not the
// test's subject.
func Empty(t testing.TB, c *s3.Client, bucket, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ups, err := c.ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: &bucket, Prefix: &prefix})
	if err != nil {
		t.Logf("emptying %s: list uploads: %v", prefix, err)
		return
	}
	for _, u := range ups.Uploads {
		if _, err := c.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &bucket, Key: u.Key, UploadId: u.UploadId}); err != nil {
			t.Logf("emptying %s: abort the upload of %s: %v", prefix, aws.ToString(u.Key), err)
		}
	}
	p := s3.NewListObjectsV2Paginator(c, &s3.ListObjectsV2Input{Bucket: &bucket, Prefix: &prefix})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			t.Logf("emptying %s: %v", prefix, err)
			return
		}
		for _, o := range page.Contents {
			if _, err := c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &bucket, Key: o.Key}); err != nil {
				t.Logf("emptying %s: delete %s: %v", prefix, aws.ToString(o.Key), err)
			}
		}
	}
}
